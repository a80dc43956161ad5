"""``LVMMedLoss``: LVM-Med's graph-matching self-supervised loss for one training step (Sec. 3.2, Eq. 1-6).

Pipeline for a batch of ``N = G * graph_size`` images seen in two views ``s`` and ``t``:

1. encoder maps ``(N, D, R, S)`` -> global average pool -> projector ``h`` (``Linear(D, proj_dim)``, the
   paper's ``2048 x 128``) -> ``z``;
2. consecutive ``graph_size`` samples form one graph (``G`` graphs, batched as ``(G, n, ...)``); per view a
   kNN graph on ``z`` (``k`` = 5, :func:`~lvmmed_monai.ssl.graph.knn_graph`) and the shared 2-layer GCN
   (Eq. 1) give ``z_hat``;
3. vertex affinity ``c_v`` (Eq. 2-3, global cosine + local costs on the feature maps) and edge affinity
   ``c_e`` over the ``n * k`` directed kNN edges of each graph (Eq. 4);
4. perturbed second-order matching and its IMLE gradient (Eq. 4, 6, Algorithm 1,
   :func:`~lvmmed_monai.ssl.imle.imle_qap`), Hamming loss to the identity (Eq. 5).

The loss is the per-graph Hamming distance (Eq. 5, a sum over the ``n x n`` entries) averaged over graphs
(``reduction="mean"``, the convention of the blackbox graph-matching code BB-GM, Rolinek et al. 2020) or
summed. ``imle_step`` says what IMLE's ``lam`` is relative to (:func:`~lvmmed_monai.ssl.imle.imle_qap`):
``"per_graph"`` (default) moves each graph's backward target by ``lam`` times its own Hamming gradient,
whatever the batch size, reduction or number of processes, as Algorithm 1 reads for one problem;
``"per_loss"`` (the convention before) moves it by ``lam * dL/dX``, i.e. ``lam / G`` per graph with "mean",
and under DDP with "mean" the engine then passes ``lam / world_size`` to match a one-process step on the
global batch (``lvmmed_monai.engines`` does this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lvmmed_monai.data.views import pool_coords
from lvmmed_monai.ssl.affinity import EDGE_FORMS, check_local_weights, edge_affinity, num_kept, vertex_affinity
from lvmmed_monai.ssl.graph import GCN, GCN_FORMS, Projector, knn_adjacency, knn_graph, normalized_adjacency
from lvmmed_monai.ssl.imle import STEP_KINDS, NoiseKey, hamming_loss, imle_qap
from lvmmed_monai.ssl.matching import pair_products

__all__ = ["LVMMedLoss", "LVMMedLossOutput", "GraphAffinities"]


@dataclass
class GraphAffinities:
    """Inputs of the matching problem for ``G`` graphs of ``n`` nodes (all float32 but the edges)."""

    c_v: Tensor  # (G, n, n) vertex affinity, Eq. 3
    c_e: Tensor  # (G, E, E) edge affinity over kNN edges, E = n * k
    edges_s: Tensor  # (G, E, 2) long, directed kNN edges (i, j) of the s graphs
    edges_t: Tensor  # (G, E, 2) long, of the t graphs


class LVMMedLossOutput(NamedTuple):
    """``loss, stats = criterion(...)``; ``stats`` holds detached 0-d tensors (no host sync):

    * ``accuracy``: share of nodes matched to their own other view (diagonal of X), in ``[0, 1]``;
    * ``identity_rate``: share of graphs whose matching is exactly the identity, in ``[0, 1]``;
    * ``objective``: mean Eq. 4 objective ``sum c_v X + sum c_e X X`` of the solver's matchings on the
      unperturbed costs (linear term only without ``second_order``);
    * ``identity_objective``: the same for the identity (the gold matching); ``hamming``: mean per graph.
    """

    loss: Tensor
    stats: dict[str, Tensor]


class LVMMedLoss(nn.Module):
    """LVM-Med's loss; owns (and trains) the projector ``h_phi`` and the GCN ``g_eps``.

    Args:
        in_dim: encoder channels ``D`` (2048 for ResNet-50, 768 for ViT-B).
        proj_dim / gcn_dim: widths of the projector output and of both GCN layers (paper: 128).
        projector_hidden_dim: None for the paper's linear projector, an int for a 2-layer MLP.
        k: neighbours per node in the kNN graphs (paper: 5). graph_size: nodes per graph (paper: 16).
        alpha: weight of the global cosine in ``c_v`` (Eq. 3; paper: 0.8).
        gamma: pairs kept by ``select_top`` in the local costs. The paper does not state it; 20 is the
            count VICRegL (whose nearest-neighbour matching appendix A follows) keeps on the 7x7 maps of
            224 px inputs; an int is clamped to the map size (all 9 positions of a 3x3 map), a float in
            ``(0, 1]`` is a fraction (0.4 reproduces VICRegL's 20 of 49 and 4 of 9).
        lam: IMLE finite-difference step ``lambda`` of Eq. 6 / Algorithm 1 (paper: 80).
        second_order: False = LAP on ``c_v`` only ("w/o second-order" ablation).
        message_passing: False = no GCN, ``z_hat = z`` ("w/o message passing").
        gumbel: False = add the constant 0.5772 (Gumbel mean) instead of Gumbel noise ("w/o Gumbel").
        noise_scale: temperature of the Gumbel noise, ``tau * Gumbel(0, 1)`` (paper: 1; see ``imle_qap``).
        local_cost: False = ``c_v`` is the global cosine alone, at full weight ("w/o local").
        num_samples: IMLE noise samples per step. method: QAP solver (``solve_qap``'s registry).
        solver_options: keyword options of that solver, e.g. ``{"tabu_iters": 25}`` for ``lvmmed`` (slower,
            closer to the optimum on noise-dominated problems; ``benchmarks/qap_solver.py``).
        reduction: "mean" or "sum" of the per-graph Hamming losses over graphs (see the module docstring).
        imle_step: "per_graph" (lam per graph, independent of the batch) or "per_loss" (lam relative to the
            reduced loss's gradient: lam / G per graph with "mean"); see the module docstring.
        check_inputs: check for NaN/Inf features and coordinates outside ``[0, 1]`` (on the pooled
            tensors, where any NaN/Inf propagates) and, in IMLE, for NaN/Inf affinities and edge indices outside
            the graph: host syncs per step; False skips them (e.g. a tuned GPU run).
        max_local_elements: chunking threshold of the local cost (see ``local_affinity``).
        edge_min_norm: floor of the embedding-difference norms in the edge affinity (see
            :func:`~lvmmed_monai.ssl.affinity.edge_affinity`: it bounds the gradient of near-duplicate edges).
        edge_form: "unit" (default: cosine of differences of unit embeddings, floored by ``edge_min_norm``) or
            "paper" (Sec. 3.2.3 literally: cosine of differences of the raw GCN outputs).
        gcn_form: "kipf" (default: symmetric kNN adjacency, ``D~`` from ``A + I``, no activation after the
            last layer) or "paper" (Eq. 1 literally: directed kNN ``A``, ``D~`` from ``A``, ``sigma`` after
            every layer); see :mod:`lvmmed_monai.ssl.graph`.
        local_weights: with several local maps (``affinities``' ``local_s`` lists, e.g. two encoder stages),
            one weight per map: the local term is their weighted sum; None: their mean.
    """

    def __init__(
        self,
        in_dim: int = 2048,
        proj_dim: int = 128,
        gcn_dim: int = 128,
        k: int = 5,
        graph_size: int = 16,
        alpha: float = 0.8,
        gamma: int | float = 20,
        lam: float = 80.0,
        second_order: bool = True,
        message_passing: bool = True,
        gumbel: bool = True,
        local_cost: bool = True,
        num_samples: int = 1,
        noise_scale: float = 1.0,
        method: str = "lvmmed",
        projector_hidden_dim: int | None = None,
        reduction: str = "mean",
        check_inputs: bool = True,
        max_local_elements: int = 2**24,
        edge_min_norm: float = 0.1,
        imle_step: str = "per_graph",
        edge_form: str = "unit",
        gcn_form: str = "kipf",
        solver_options: dict | None = None,
        local_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= k < graph_size:
            raise ValueError(f"need 1 <= k < graph_size, got k={k}, graph_size={graph_size}")
        if not 0.0 <= alpha <= 1.0 or lam <= 0 or num_samples < 1 or noise_scale < 0:
            raise ValueError(f"need 0 <= alpha <= 1, lam > 0, num_samples >= 1 and noise_scale >= 0; got "
                             f"alpha={alpha}, lam={lam}, num_samples={num_samples}, noise_scale={noise_scale}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if imle_step not in STEP_KINDS:
            raise ValueError(f"imle_step must be one of {list(STEP_KINDS)}, got {imle_step!r}")
        if edge_form not in EDGE_FORMS or gcn_form not in GCN_FORMS:
            raise ValueError(f"edge_form must be one of {list(EDGE_FORMS)} and gcn_form one of {list(GCN_FORMS)}, "
                             f"got {edge_form!r} and {gcn_form!r}")
        self.imle_step, self.edge_form, self.gcn_form = imle_step, edge_form, gcn_form
        # validated here (finite, >= 0, not all zero); their count is checked against the maps in affinities
        self.local_weights = None if local_weights is None else check_local_weights(local_weights, len(local_weights))
        num_kept(gamma, 1)  # validates gamma
        self.projector = Projector(in_dim, proj_dim, projector_hidden_dim)
        self.gcn = (GCN(proj_dim, gcn_dim, gcn_dim, num_layers=2, final_activation=GCN_FORMS[gcn_form][2])
                    if message_passing else None)
        self.in_dim, self.k, self.graph_size = in_dim, k, graph_size
        self.alpha, self.gamma, self.lam = alpha, gamma, lam
        self.second_order, self.gumbel, self.local_cost = second_order, gumbel, local_cost
        self.num_samples, self.method, self.reduction = num_samples, method, reduction
        self.noise_scale, self.solver_options = noise_scale, dict(solver_options or {})
        self.check_inputs, self.max_local_elements = check_inputs, max_local_elements
        if edge_min_norm < 0:
            raise ValueError(f"edge_min_norm must be >= 0, got {edge_min_norm}")
        self.edge_min_norm = edge_min_norm

    def _check(
        self, feats_s: Tensor, feats_t: Tensor, coords_s: Tensor | None, coords_t: Tensor | None
    ) -> None:
        for name, f in (("feats_s", feats_s), ("feats_t", feats_t)):
            if f.dim() != 4 or f.shape[1] != self.in_dim:
                raise ValueError(
                    f"{name} must be encoder maps (N, D={self.in_dim}, R, S), got {tuple(f.shape)}"
                )
        n_img = feats_s.shape[0]
        if feats_t.shape[0] != n_img:
            raise ValueError(f"the two views hold {n_img} and {feats_t.shape[0]} images; they must be paired")
        if n_img == 0 or n_img % self.graph_size:
            raise ValueError(
                f"batch size N={n_img} must be a positive multiple of graph_size={self.graph_size}: use a "
                f"batch size that is a multiple of {self.graph_size} (DataLoader(drop_last=True)) or set "
                "graph_size to a divisor of N"
            )
        if self.local_cost:
            for name, c in (("coords_s", coords_s), ("coords_t", coords_t)):
                if c is None:
                    raise ValueError(f"local_cost=True needs {name} (N, 2, H, W) from LVMMedViewsd")
                if c.dim() != 4 or c.shape[:2] != (n_img, 2):
                    raise ValueError(
                        f"{name} must be (N={n_img}, 2, H, W) coordinate maps, got {tuple(c.shape)}"
                    )

    @staticmethod
    def _check_values(pooled: list[Tensor], positions: list[Tensor]) -> None:
        """NaN/Inf in any feature propagates to its pooled mean, so the small pooled tensors are checked."""
        ok = [torch.isfinite(t).all() for t in pooled + positions]
        ok += [((c >= -1e-3) & (c <= 1 + 1e-3)).all() for c in positions]
        ok_all = torch.stack(ok)
        if not bool(ok_all.all()):
            names = ["feats_s", "feats_t", "coords_s", "coords_t", "coords_s range", "coords_t range"]
            bad = [nm for nm, good in zip(names, ok_all.tolist(), strict=False) if not good]
            raise ValueError(f"bad LVMMedLoss input: {bad} (NaN/Inf, or coordinates outside [0, 1]; "
                             "coordinates are normalised by the original image size, see LVMMedViewsd); NaN/Inf "
                             "features: check the input images, or lower the learning rate of a diverged run")

    def _graphs(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(2G, n, F)`` embeddings of both views -> (``z_hat`` after the GCN, kNN edges ``(2G, nk, 2)``)."""
        edges = knn_graph(z, self.k)
        if self.gcn is None:
            return z, edges
        symmetric, self_loop_degree, _ = GCN_FORMS[self.gcn_form]
        adj = normalized_adjacency(knn_adjacency(edges, z.shape[1], symmetric=symmetric), self_loop_degree)
        return self.gcn(z, adj), edges

    def affinities(
        self,
        feats_s: Tensor,
        feats_t: Tensor,
        coords_s: Tensor | None = None,
        coords_t: Tensor | None = None,
        local_s: Tensor | Sequence[Tensor] | None = None,
        local_t: Tensor | Sequence[Tensor] | None = None,
    ) -> GraphAffinities:
        """Projector, kNN graphs, GCN and the affinities of Eq. 3-4 (float32, autocast off).

        ``local_s`` / ``local_t``: ``(N, C, R', S')`` maps for the local cost instead of ``feats_s`` /
        ``feats_t`` (e.g. an earlier encoder stage, finer than the last one on small images); both or neither.
        A sequence of such maps per view (e.g. two stages) makes the local cost the mean over them (or their sum
        weighted by ``local_weights``).
        """
        self._check(feats_s, feats_t, coords_s, coords_t)
        if (local_s is None) != (local_t is None):
            raise ValueError("give local_s and local_t together (the local cost's maps of both views), or neither")
        if local_s is not None:
            local_s, local_t = ([m] if isinstance(m, Tensor) else list(m) for m in (local_s, local_t))
            if len(local_s) != len(local_t) or not local_s:
                raise ValueError(f"local_s and local_t must hold the same number (>= 1) of maps, got "
                                 f"{len(local_s)} and {len(local_t)}")
            for ms, mt in zip(local_s, local_t, strict=True):
                for name, m, f in (("local_s", ms, feats_s), ("local_t", mt, feats_t)):
                    if m.dim() != 4 or m.shape[0] != f.shape[0] or m.shape[1] != ms.shape[1]:
                        raise ValueError(f"{name} must be (N={f.shape[0]}, C, R, S) maps with the channels of "
                                         f"local_s, got {tuple(m.shape)}")
        g, n = feats_s.shape[0] // self.graph_size, self.graph_size
        with torch.autocast(device_type=feats_s.device.type, enabled=False):
            ys, yt = feats_s.float(), feats_t.float()
            pooled = [ys.mean((2, 3)), yt.mean((2, 3))]  # Avg of Sec. 3.2.1, (N, D)
            local = {}
            if self.local_cost:
                pairs = [(ys, yt)] if local_s is None else zip(local_s, local_t, strict=True)
                levels = [(a.float(), b.float()) for a, b in pairs]
                local = {  # one (G, n, P, D) map and its (G, n, P, 2) positions per level and view
                    "ys": [ms.flatten(2).transpose(1, 2).reshape(g, n, -1, ms.shape[1]) for ms, _ in levels],
                    "yt": [mt.flatten(2).transpose(1, 2).reshape(g, n, -1, mt.shape[1]) for _, mt in levels],
                    "pos_s": [self._positions(coords_s, ms, g, n) for ms, _ in levels],
                    "pos_t": [self._positions(coords_t, mt, g, n) for _, mt in levels],
                }
            if self.check_inputs:
                self._check_values(pooled, [*local["pos_s"], *local["pos_t"]] if local else [])
            z = torch.cat([self.projector(pooled[0]), self.projector(pooled[1])])
            z_hat, edges = self._graphs(z.view(2 * g, n, -1))
            zs, zt = z_hat[:g], z_hat[g:]
            c_v = vertex_affinity(zs, zt, **local, alpha=self.alpha, gamma=self.gamma,
                                  max_elements=self.max_local_elements, local_weights=self.local_weights)
            c_e = edge_affinity(zs, zt, edges[:g], edges[g:], min_norm=self.edge_min_norm, form=self.edge_form)
        return GraphAffinities(c_v, c_e, edges[:g], edges[g:])

    @staticmethod
    def _positions(coords: Tensor, feats: Tensor, g: int, n: int) -> Tensor:
        """Coordinate maps at any resolution -> ``(G, n, P, 2)`` at the feature-map grid (cell means)."""
        grid = pool_coords(coords.float(), feats.shape[-2:])
        return grid.flatten(2).transpose(1, 2).reshape(g, n, -1, 2)

    def match(
        self, aff: GraphAffinities, generator: torch.Generator | NoiseKey | None = None, *,
        second_order: bool | None = None,
        noise_scale: float | None = None, lam: float | None = None,
    ) -> LVMMedLossOutput:
        """Perturbed matching with IMLE gradients (Eq. 4, 6) and the Hamming loss to the identity (Eq. 5).

        ``second_order``, ``noise_scale`` and ``lam`` override the configured values for this call only (None:
        the configured one), e.g. :class:`~lvmmed_monai.engines.FirstOrderWarmup`'s noise-free first-order
        iterations; the criterion itself is never changed, so what the config says is what it holds.
        """
        second_order = self.second_order if second_order is None else bool(second_order)
        x = imle_qap(
            aff.c_v, aff.c_e, aff.edges_s, aff.edges_t, lam=self.lam if lam is None else lam, step=self.imle_step,
            noise="gumbel" if self.gumbel else "constant",
            noise_scale=self.noise_scale if noise_scale is None else noise_scale, num_samples=self.num_samples,
            second_order=second_order, method=self.method, generator=generator, check_inputs=self.check_inputs,
            solver_options=self.solver_options,
        )
        per_graph = hamming_loss(x)
        loss = per_graph.mean() if self.reduction == "mean" else per_graph.sum()
        return LVMMedLossOutput(loss, self._stats(aff, x.detach(), per_graph.detach(), second_order))

    def _stats(self, aff: GraphAffinities, x: Tensor, per_graph: Tensor, second_order: bool) -> dict[str, Tensor]:
        with torch.no_grad():
            diag = x.diagonal(dim1=1, dim2=2)
            eye = torch.eye(x.shape[-1], device=x.device).expand_as(x)
            c_v = aff.c_v.detach()
            obj, obj_id = (c_v * x).sum((1, 2)), c_v.diagonal(dim1=1, dim2=2).sum(1)
            if second_order:  # + sum c_e X X over edge pairs, from the edge lists (no n^2 x n^2 Lawler matrix)
                c_e = aff.c_e.detach()
                obj = obj + (c_e * pair_products(x[None], aff.edges_s, aff.edges_t)[0]).sum((1, 2))
                obj_id = obj_id + (c_e * pair_products(eye[None], aff.edges_s, aff.edges_t)[0]).sum((1, 2))
            return {
                "accuracy": diag.mean(), "identity_rate": (diag > 0.5).all(-1).float().mean(),
                "objective": obj.mean(), "identity_objective": obj_id.mean(), "hamming": per_graph.mean(),
            }

    def forward(
        self,
        feats_s: Tensor,
        feats_t: Tensor,
        coords_s: Tensor | None = None,
        coords_t: Tensor | None = None,
        generator: torch.Generator | NoiseKey | None = None,
        local_s: Tensor | None = None,
        local_t: Tensor | None = None,
        **overrides: float | bool | None,
    ) -> LVMMedLossOutput:
        """One step's loss (``overrides``: ``second_order``, ``noise_scale``, ``lam`` for this call, see
        :meth:`match`).

        Args:
            feats_s, feats_t: ``(N, D, R, S)`` encoder maps of the two views (sample i of both = image i;
                the spatial sizes of the views may differ, e.g. a global and a local crop).
            coords_s, coords_t: ``(N, 2, H, W)`` normalised original-image ``(y, x)`` per pixel of each view
                (``LVMMedViewsd``'s ``coords_s``/``coords_t``, or already ``(N, 2, R, S)``); average-pooled
                to the feature grid. Needed only with ``local_cost``.
            generator: optional RNG for the Gumbel noise (reproducible steps), or a
                :class:`~lvmmed_monai.ssl.imle.NoiseKey` (each graph's noise from its global index: DDP exact).
            local_s, local_t: maps for the local cost instead of ``feats_s`` / ``feats_t`` (see
                :meth:`affinities`).

        Returns:
            :class:`LVMMedLossOutput` ``(loss, stats)``.
        """
        aff = self.affinities(feats_s, feats_t, coords_s, coords_t, local_s, local_t)
        return self.match(aff, generator, **overrides)
