"""kNN graphs on node embeddings and the message-passing GCN of LVM-Med (Sec. 3.2.1, Eq. 1).

A batch of ``N = G * n`` images is ``G`` independent graphs of ``n`` nodes; every function here takes the
graphs batched as ``(G, n, ...)`` tensors and runs them all at once.

Graph conventions (tested in ``tests/ssl/test_graph.py``):

* kNN: node ``i`` points to its ``k`` nearest other nodes in squared Euclidean distance of ``z``; itself is
  excluded (a self-loop would make every node its own nearest neighbour, and Eq. 1 adds ``I`` anyway).
  Ties (duplicated samples, constant images) go to the lower node index (stable sort), so the graph is
  deterministic on every device. The ``n * k`` directed edges per graph are the edge sets ``E^s, E^t``
  over which the edge affinity ``c^e`` is defined (fixed size, so all graphs batch).
* GCN adjacency: the kNN relation is not symmetric, and Eq. 1's normalisation ``D^-1/2 (A + I) D^-1/2``
  is the symmetric one of Kipf & Welling [51], defined for an undirected ``A``; we therefore use the
  union ``max(A, A^T)`` (an edge if either node lists the other), so every node keeps all its k
  neighbours and the propagation matrix is symmetric with eigenvalues in ``(-1, 1]``. ``D~`` is the
  degree of ``A + I`` (Kipf's renormalisation; the paper's text writes ``sum_j A_ij``, which would leave
  ``D^-1/2 (A + I) D^-1/2`` unnormalised by the self-loop).
* The paper's literal Eq. 1 (``GCN_FORMS["paper"]``, ``LVMMedLoss(gcn_form="paper")``): ``A`` the directed
  kNN relation as defined (``A_ij = 1`` iff ``e_ij`` is an edge), ``D~_ii = sum_j A_ij`` (= k for every node)
  and ``sigma`` after every layer, the last included (``z_hat >= 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["knn_graph", "knn_adjacency", "normalized_adjacency", "GCN", "GCN_FORMS", "Projector"]

# gcn_form -> (symmetric A, self-loops counted in D~, activation after the last layer); see the module docstring
GCN_FORMS = {"kipf": (True, True, False), "paper": (False, False, True)}


def _check_nodes(z: Tensor, name: str = "z") -> None:
    if z.dim() != 3:
        raise ValueError(f"{name} must be (G, n, F) node embeddings of G graphs, got {tuple(z.shape)}")


@torch.no_grad()
def knn_graph(z: Tensor, k: int) -> Tensor:
    """Directed kNN edges of each graph: ``(G, n, F)`` -> ``(G, n * k, 2)`` long ``(i, j)``.

    Edge ``i * k + r`` joins node ``i`` to its ``r``-th nearest other node ``j`` (squared Euclidean
    distance, computed exactly as a difference so duplicates tie exactly; ties -> lower ``j``). Not
    differentiable (indices only), like the paper's ``k-nearest-neighbor(Zs, k_connects)``.
    """
    _check_nodes(z)
    g, n, _ = z.shape
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < graph size n = {n}, got k = {k}")
    zf = z.float()
    dist = (zf[:, :, None, :] - zf[:, None, :, :]).pow(2).sum(-1)  # (G, n, n), exact, symmetric
    dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # no self edges
    nbr = torch.sort(dist, dim=-1, stable=True).indices[..., :k]  # (G, n, k)
    src = torch.arange(n, device=z.device).view(1, n, 1).expand(g, n, k)
    return torch.stack([src, nbr], dim=-1).reshape(g, n * k, 2)


def knn_adjacency(edges: Tensor, n: int, symmetric: bool = True) -> Tensor:
    """``(G, E, 2)`` directed edges -> ``(G, n, n)`` float 0/1 adjacency (``max(A, A^T)`` if symmetric)."""
    if edges.dim() != 3 or edges.shape[-1] != 2:
        raise ValueError(f"edges must be (G, E, 2) node index pairs, got {tuple(edges.shape)}")
    g = edges.shape[0]
    adj = torch.zeros(g, n * n, device=edges.device)
    adj.scatter_(1, edges[..., 0] * n + edges[..., 1], 1.0)
    adj = adj.view(g, n, n)
    return torch.maximum(adj, adj.transpose(1, 2)) if symmetric else adj


def normalized_adjacency(adj: Tensor, self_loop_degree: bool = True) -> Tensor:
    """Eq. 1 propagation matrix ``D~^-1/2 (A + I) D~^-1/2``: ``(G, n, n)``.

    ``D~ = diag(rowsum(A + I))`` (Kipf's renormalisation, default) or, with ``self_loop_degree=False``, the
    paper's literal ``diag(rowsum(A))``; a node without out-edges then counts its self-loop alone (degree 1),
    never a division by zero (a kNN graph gives every node k >= 1 out-edges anyway).
    """
    eye = torch.eye(adj.shape[-1], device=adj.device, dtype=adj.dtype)
    a = adj + eye
    d = (a if self_loop_degree else adj).sum(-1).clamp_min(1.0).rsqrt()
    return d[:, :, None] * a * d[:, None, :]


class GCN(nn.Module):
    """Graph convolutional network ``g_eps`` of Eq. 1: ``H_l = sigma(A_hat H_{l-1} W_{l-1})``, dense, batched.

    ``num_layers`` layers (paper: 2 of width 128), no bias (as Eq. 1), ReLU between layers and, by default,
    none after the last one, so ``z_hat`` can take any sign like ``z`` (a final ReLU would confine every
    cosine of Eq. 2-4 to ``[0, 1]``); ``final_activation=True`` is Eq. 1 literally (``sigma`` on every layer).
    Written by hand because graphs of ~16 nodes batch best as dense ``(G, n, n)``
    matmuls; torch_geometric's sparse scatter would add a dependency and be slower at this size.
    """

    def __init__(
        self, in_dim: int = 128, hidden_dim: int = 128, out_dim: int = 128, num_layers: int = 2,
        final_activation: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        pairs = zip(dims[:-1], dims[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        self.act = nn.ReLU()
        self.final_activation = final_activation

    def forward(self, x: Tensor, adj_norm: Tensor) -> Tensor:
        """``x (G, n, in_dim)``, ``adj_norm (G, n, n)`` (see normalized_adjacency) -> ``(G, n, out_dim)``."""
        _check_nodes(x, "x")
        if adj_norm.shape != (x.shape[0], x.shape[1], x.shape[1]):
            raise ValueError(f"adj_norm must be (G, n, n) = {tuple(x.shape[:2]) + (x.shape[1],)}, "
                             f"got {tuple(adj_norm.shape)}")
        for idx, layer in enumerate(self.layers):
            x = torch.bmm(adj_norm, layer(x))
            if self.final_activation or idx < len(self.layers) - 1:
                x = self.act(x)
        return x


class Projector(nn.Sequential):
    """Projector ``h_phi``: pooled encoder features ``(N, D)`` -> embeddings ``z`` ``(N, out_dim)``.

    The paper gives its size as ``2048 x 128`` (R50) / ``768 x 128`` (ViT): one linear layer, the default
    here. ``hidden_dim`` switches to a SimCLR-style MLP (Linear-BatchNorm-ReLU-Linear) for experiments.
    """

    def __init__(self, in_dim: int = 2048, out_dim: int = 128, hidden_dim: int | None = None) -> None:
        if hidden_dim is None:
            super().__init__(nn.Linear(in_dim, out_dim))
        else:
            super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                             nn.Linear(hidden_dim, out_dim))
        self.in_dim = in_dim
        self.out_dim = out_dim
