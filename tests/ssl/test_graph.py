"""kNN graph and GCN (Eq. 1) against brute force and the dense formula computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvmmed_monai.ssl.graph import GCN, GCN_FORMS, Projector, knn_adjacency, knn_graph, normalized_adjacency


def _knn_loop(z: np.ndarray, k: int) -> list[list[list[int]]]:
    """Brute force: for every graph and node, the k other nodes by (distance, index)."""
    out = []
    for zg in z:
        rows = []
        for i in range(len(zg)):
            d = [(float(((zg[i] - zg[j]) ** 2).sum()), j) for j in range(len(zg)) if j != i]
            rows.append([j for _, j in sorted(d)[:k]])
        out.append(rows)
    return out


def test_knn_graph_matches_brute_force():
    z = torch.randn(3, 9, 4, dtype=torch.float64)
    edges = knn_graph(z, k=3)
    assert edges.shape == (3, 27, 2) and edges.dtype == torch.long
    expected = _knn_loop(z.numpy(), 3)
    for g in range(3):
        for i in range(9):
            assert edges[g, i * 3 : i * 3 + 3, 0].tolist() == [i] * 3
            assert edges[g, i * 3 : i * 3 + 3, 1].tolist() == expected[g][i]


def test_knn_ties_are_deterministic_and_exclude_self():
    z = torch.zeros(1, 6, 3)
    z[0, 3:] = 1.0  # nodes 0-2 identical, 3-5 identical
    edges = knn_graph(z, k=2)
    nbrs = edges[0, :, 1].view(6, 2).tolist()
    assert nbrs == [[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]]
    const = knn_graph(torch.ones(2, 5, 4), k=4)  # all tied: lower indices first, never itself
    assert const[1, :, 1].view(5, 4).tolist() == [[j for j in range(5) if j != i] for i in range(5)]


def test_knn_rejects_k_too_large():
    with pytest.raises(ValueError, match="k must satisfy"):
        knn_graph(torch.randn(1, 5, 2), k=5)


def test_adjacency_symmetrised_union_without_self_loops():
    z = torch.randn(2, 10, 3)
    edges = knn_graph(z, k=3)
    a_dir = knn_adjacency(edges, 10, symmetric=False)
    a = knn_adjacency(edges, 10)
    assert torch.equal(a_dir.sum(-1), torch.full((2, 10), 3.0))
    for g in range(2):
        for i, j in edges[g].tolist():
            assert a[g, i, j] == 1 and a[g, j, i] == 1
    assert torch.equal(a, a.transpose(1, 2)) and torch.equal(a, torch.maximum(a_dir, a_dir.transpose(1, 2)))
    assert a.diagonal(dim1=1, dim2=2).abs().sum() == 0 and (a.sum(-1) >= 3).all()


def _dense_eq1(x: np.ndarray, a: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """Eq. 1 by hand: A~ = A + I, D~_ii = sum_j A~_ij, H1 = relu(D^-1/2 A~ D^-1/2 X W0), Z = (...) H1 W1."""
    at = a + np.eye(len(a))
    dinv = np.diag(1.0 / np.sqrt(at.sum(1)))
    prop = dinv @ at @ dinv
    h1 = np.maximum(prop @ x @ w0, 0.0)
    return prop @ h1 @ w1


def test_gcn_equals_dense_formula():
    torch.manual_seed(1)
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    a = knn_adjacency(knn_graph(x, k=2), 7).double()
    gcn = GCN(5, 6, 4).double()
    out = gcn(x, normalized_adjacency(a))
    w0, w1 = gcn.layers[0].weight.detach().numpy().T, gcn.layers[1].weight.detach().numpy().T
    for g in range(2):
        ref = _dense_eq1(x[g].numpy(), a[g].numpy(), w0, w1)
        np.testing.assert_allclose(out[g].detach().numpy(), ref, rtol=1e-12, atol=1e-12)


def _dense_eq1_literal(x: np.ndarray, a: np.ndarray, w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """Eq. 1 as printed: D~_ii = sum_j A_ij (A without I), sigma = ReLU after both layers."""
    prop = np.diag(1.0 / np.sqrt(a.sum(1))) @ (a + np.eye(len(a))) @ np.diag(1.0 / np.sqrt(a.sum(1)))
    return np.maximum(prop @ np.maximum(prop @ x @ w0, 0.0) @ w1, 0.0)


def test_gcn_paper_form_equals_literal_eq1():
    """gcn_form="paper": the directed kNN A (rows sum to k), D~ from A alone, ReLU after every layer."""
    torch.manual_seed(2)
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    symmetric, self_loop_degree, final = GCN_FORMS["paper"]
    a = knn_adjacency(knn_graph(x, k=3), 7, symmetric=symmetric).double()
    assert (a.sum(-1) == 3).all()  # directed: each node lists exactly its k neighbours
    gcn = GCN(5, 6, 4, final_activation=final).double()
    out = gcn(x, normalized_adjacency(a, self_loop_degree=self_loop_degree))
    w0, w1 = gcn.layers[0].weight.detach().numpy().T, gcn.layers[1].weight.detach().numpy().T
    for g in range(2):
        ref = _dense_eq1_literal(x[g].numpy(), a[g].numpy(), w0, w1)
        np.testing.assert_allclose(out[g].detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    assert (out >= 0).all()
    # the two forms differ (the default has no final ReLU and counts self-loops in D~)
    kipf = GCN(5, 6, 4).double()
    kipf.load_state_dict(gcn.state_dict())
    a_sym = knn_adjacency(knn_graph(x, k=3), 7).double()
    assert not torch.allclose(kipf(x, normalized_adjacency(a_sym)), out)


def test_normalized_adjacency_hand_values():
    a = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])  # path 0-1-2
    deg = torch.tensor([2.0, 3.0, 2.0])  # with self-loops
    expected = (a[0] + torch.eye(3)) / torch.sqrt(deg[:, None] * deg[None, :])
    torch.testing.assert_close(normalized_adjacency(a)[0], expected)
    deg_a = torch.tensor([1.0, 2.0, 1.0])  # the paper's D~ = rowsum(A), self-loops not counted
    expected = (a[0] + torch.eye(3)) / torch.sqrt(deg_a[:, None] * deg_a[None, :])
    torch.testing.assert_close(normalized_adjacency(a, self_loop_degree=False)[0], expected)


def test_gcn_permutation_equivariant():
    x = torch.randn(1, 8, 5)
    perm = torch.randperm(8)
    gcn = GCN(5, 8, 8)
    adj = normalized_adjacency(knn_adjacency(knn_graph(x, 3), 8))
    adj_p = adj[:, perm][:, :, perm]
    torch.testing.assert_close(gcn(x[:, perm], adj_p), gcn(x, adj)[:, perm])


def test_gcn_shape_errors_and_projector():
    with pytest.raises(ValueError, match="adj_norm"):
        GCN(5)(torch.randn(2, 4, 5), torch.eye(3).expand(2, 3, 3))
    assert Projector(32, 8)(torch.randn(4, 32)).shape == (4, 8)
    assert len(Projector(32, 8)) == 1  # the paper's single linear layer
    assert Projector(32, 8, hidden_dim=16)(torch.randn(4, 32)).shape == (4, 8)
