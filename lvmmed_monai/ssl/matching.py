"""Batched graph-matching solvers for LVM-Med's second-order matching (Eq. 4) and its LAP ablation.

Pairings use the row-major index ``p = i * n + a`` (node i of graph s with node a of graph t), so a
permutation matrix ``X`` ``(G, n, n)`` is the indicator vector ``x = X.reshape(G, n * n)`` and the Eq. 4
objective is ``x^T K x`` with the Lawler matrix ``K`` ``(G, n*n, n*n)``. Every solver runs all G problems at
once as tensor ops on their device (CPU or CUDA), with no Python loop per problem or node.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lvmmed_monai.registry import Registry

__all__ = ["lawler_from_edges", "lawler_edges", "pair_products", "qap_objective", "solve_lap", "solve_qap",
           "lvmmed_qap", "QAP_SOLVERS"]


def lawler_from_edges(
    c_v: Tensor, c_e: Tensor, edges_s: Tensor, edges_t: Tensor, check_indices: bool = True
) -> Tensor:
    """Dense Lawler matrix of Eq. 4 from vertex and edge affinities.

    Args:
        c_v: ``(G, n, n)`` vertex affinities c^v_{ia}.
        c_e: ``(G, E, F)`` edge affinities c^e_{ia,jb} of edge e = (i, j) of graph s and f = (a, b) of t.
        edges_s: ``(G, E, 2)`` long, directed edges (i, j) of graph s; edges_t: ``(G, F, 2)``, edges (a, b).
        check_indices: check that every node index lies in ``[0, n)`` (a host sync; shapes are always checked).

    Returns:
        ``K`` ``(G, n*n, n*n)``: c_v on the diagonal, ``c_e[g, e, f]`` added at ``(i_e*n + a_f, j_e*n + b_f)``
        (one batched scatter_add; duplicate edges add up), symmetrised ``(K + K^T) / 2``, so that
        ``x^T K x = sum c_v X + sum_{e,f} c_e[e, f] X[i_e, a_f] X[j_e, b_f]``. Differentiable in c_v, c_e.
        ``lawler_edges(...) + torch.diag_embed(c_v.reshape(G, n * n))``, bit for bit.
    """
    if c_v.dim() != 3 or c_v.shape[1] != c_v.shape[2]:
        raise ValueError(f"c_v must have shape (G, n, n), got {tuple(c_v.shape)}")
    g, n, _ = c_v.shape
    dtype = torch.promote_types(c_v.dtype, c_e.dtype)
    edge_part = lawler_edges(c_e.to(dtype), edges_s, edges_t, n, check_indices)
    return edge_part + torch.diag_embed(c_v.to(dtype).reshape(g, n * n))


def lawler_edges(c_e: Tensor, edges_s: Tensor, edges_t: Tensor, n: int, check_indices: bool = True) -> Tensor:
    """The edge part of :func:`lawler_from_edges` (its zero-diagonal-vertex Lawler matrix), ``(G, n*n, n*n)``:
    problems that share ``c_e`` and differ in ``c_v`` (IMLE's forward and backward solves) build it once."""
    g = c_e.shape[0]
    for name, e in (("edges_s", edges_s), ("edges_t", edges_t)):
        if e.dim() != 3 or e.shape[0] != g or e.shape[2] != 2:
            raise ValueError(f"{name} must have shape (G={g}, num_edges, 2), got {tuple(e.shape)}")
        if e.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer (long) tensor, got {e.dtype}")
        if check_indices and e.numel() and bool(((e < 0) | (e >= n)).any()):
            raise ValueError(f"{name} has node indices outside [0, {n})")
    if c_e.shape != (g, edges_s.shape[1], edges_t.shape[1]):
        want = (g, edges_s.shape[1], edges_t.shape[1])
        raise ValueError(f"c_e must have shape (G, E, F) = {want}, got {tuple(c_e.shape)}")
    nn, dtype = n * n, c_e.dtype
    rows, cols = _edge_pairings(edges_s, edges_t, n)
    k = torch.zeros(g, nn * nn, dtype=dtype, device=c_e.device)
    k = k.scatter_add(1, (rows * nn + cols).reshape(g, -1), c_e.reshape(g, -1)).view(g, nn, nn)
    return 0.5 * (k + k.transpose(1, 2))


def _edge_pairings(edges_s: Tensor, edges_t: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """For every edge pair (e, f), ``(G, E, F)`` long: the pairings ``i_e * n + a_f`` and ``j_e * n + b_f``."""
    es, et = edges_s.long(), edges_t.long()
    return es[:, :, None, 0] * n + et[:, None, :, 0], es[:, :, None, 1] * n + et[:, None, :, 1]


def pair_products(x: Tensor, edges_s: Tensor, edges_t: Tensor) -> Tensor:
    """``X[i_e, a_f] * X[j_e, b_f]`` for every edge pair, ``(S, G, n, n) -> (S, G, E, F)``: the derivative of
    the Eq. 4 objective with respect to ``c_e[e, f]`` (so ``sum c_e * pair_products`` is its edge term)."""
    s, g, n, _ = x.shape
    first, second = _edge_pairings(edges_s, edges_t, n)
    xf = x.reshape(s, g, n * n)

    def take(idx: Tensor) -> Tensor:
        return xf.gather(2, idx.reshape(1, g, -1).expand(s, -1, -1)).view(s, *idx.shape)

    return take(first) * take(second)


def qap_objective(K: Tensor, X: Tensor) -> Tensor:
    """``x^T K x`` per problem, ``(G,)``, with ``x = X.reshape(G, n*n)`` (Eq. 4 without the minus sign)."""
    x = X.reshape(X.shape[0], -1).to(K.dtype)
    if K.dim() != 3 or K.shape[1] != x.shape[1] or K.shape[2] != x.shape[1]:
        raise ValueError(f"K {tuple(K.shape)} does not match X {tuple(X.shape)}: need K (G, n*n, n*n)")
    return torch.einsum("gp,gpq,gq->g", x, K, x)


def hungarian_batched(cost: Tensor, early_exit: bool | None = None) -> Tensor:
    """Minimum-cost assignments ``(G, n, n)`` -> 0/1 matrices ``(G, n, n)`` in cost's dtype.

    Shortest augmenting paths with potentials u, v (column 0 is the textbook dummy column; rows and
    columns are 1-based inside). Row r enters in outer step r; its Dijkstra search and its augmentation
    take at most r steps each, so fixed loop counts cover every problem and finished problems are masked
    (no host sync on CUDA). On CPU, where the check is free, the loops stop once every problem is done
    (``early_exit``; default: on CPU only).
    """
    g, n, _ = cost.shape
    dev, dt, m = cost.device, cost.dtype, n + 1
    c = torch.zeros(g, m, m, dtype=dt, device=dev)
    c[:, 1:, 1:] = cost
    c, row0 = c.view(g * m, m), torch.arange(g, device=dev)[:, None] * m
    u, v = torch.zeros(g, m, dtype=dt, device=dev), torch.zeros(g, m, dtype=dt, device=dev)
    p = torch.zeros(g, m, dtype=torch.long, device=dev)  # p[:, j] = row on column j, 0 = free
    way = torch.zeros(g, m, dtype=torch.long, device=dev)
    early = not cost.is_cuda if early_exit is None else early_exit
    for row in range(1, m):
        p[:, 0] = row
        j0 = torch.zeros(g, 1, dtype=torch.long, device=dev)
        minv = torch.full((g, m), float("inf"), dtype=dt, device=dev)
        used = torch.zeros(g, m, dtype=torch.bool, device=dev)
        active = torch.ones(g, 1, dtype=torch.bool, device=dev)
        for _ in range(row):  # Dijkstra steps; a finished problem's path columns are used, hence frozen
            used.scatter_(1, j0, True)
            i0 = p.gather(1, j0)
            cur = c.index_select(0, (row0 + i0).view(-1)) - u.gather(1, i0) - v
            better = (cur < minv) & ~used
            minv, way = torch.where(better, cur, minv), torch.where(better, j0, way)
            masked = minv.masked_fill(used, float("inf"))
            delta, j1 = masked.min(1, keepdim=True)  # min(dim): ~2x faster than argmin + gather on CPU
            delta = delta * active
            u.scatter_add_(1, p, used * delta)
            v, minv = v - used * delta, minv - delta
            j0 = torch.where(active, j1, j0)
            active = active & (p.gather(1, j0) != 0)
            if early and not bool(active.any()):
                break
        for _ in range(row):  # augment along the alternating path back to the dummy column
            j1 = way.gather(1, j0)
            p.scatter_(1, j0, torch.where(j0 != 0, p.gather(1, j1), p.gather(1, j0)))
            j0 = torch.where(j0 != 0, j1, j0)
            if early and not bool(j0.any()):
                break
    x = torch.zeros(g, m, m, dtype=dt, device=dev)
    return x.scatter_(1, p[:, None, :], 1.0)[:, 1:, 1:]


def solve_lap(scores: Tensor) -> Tensor:
    """Exact linear assignment: 0/1 permutation matrices ``(G, n, n)`` (float32) maximising sum(scores X).

    ``scores`` ``(G, n, n)``: e.g. the vertex term alone (the paper's "w/o second-order" ablation).
    Why not scipy's or pygmtools' ``hungarian``: both copy to the CPU and solve one problem after the other
    in a Python loop (pygmtools calls ``scipy.optimize.linear_sum_assignment`` per problem), stalling a GPU
    step that matches hundreds of graphs. Here the Hungarian method (shortest augmenting paths with dual
    potentials, O(n^3)) advances all problems at once; its loops run over rows and Dijkstra steps, each step
    a few ops on ``(G, n + 1)`` tensors. Exactness: it ends with an assignment and dual potentials in
    complementary slackness, which certifies optimality for any real scores (no integrality or epsilon
    assumption, unlike an auction); it runs in float64, so only assignments tied to ~1e-12 are confused.
    """
    if scores.dim() != 3 or scores.shape[1] != scores.shape[2]:
        raise ValueError(f"scores must have shape (G, n, n), got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf values")
    return hungarian_batched(-scores.detach().to(torch.float64)).to(torch.float32)


class _SwapSearch:
    """Best-improvement 2-swap local search for B searches at once; search b is an assignment (row i ->
    column sigma[b, i]) of problem ``pid[b]``.

    Keeps ``h = K x`` ``(B, N)`` and the gain of every swap ``gain`` ``(B, n, n)``. Swapping rows r, s
    trades pairings P1 = (r, sigma_r), P2 = (s, sigma_s) for Q1 = (r, sigma_s), Q2 = (s, sigma_r); with
    d = e_Q1 + e_Q2 - e_P1 - e_P2 and K symmetric the gain is ``2 d^T K x + d^T K d``. After a swap (u, v),
    ``rho = K d_uv`` is four rows of K; every gain not involving u or v changes by ``2 d_rs^T rho`` (O(1)
    each) and rows/columns u, v are recomputed, so a swap costs O(n^2) per search, not O(n^4).
    """

    # K at (P1, P2), (Q1, Q2) [+], (P1, Q1), (P1, Q2), (P2, Q1), (P2, Q2) [-]; indices into (Q1, Q2, P1, P2)
    quad_rows, quad_cols = (2, 0, 2, 2, 3, 3), (3, 1, 0, 1, 0, 1)

    def __init__(self, K: Tensor, pid: Tensor, sigma: Tensor | None = None) -> None:
        self.K, self.pid, self.nn = K, pid, K.shape[1]
        self.n, dev = int(round(self.nn**0.5)), K.device
        self.krows, self.kflat = K.reshape(-1, self.nn), K.reshape(-1)
        self.kd = torch.diagonal(K, dim1=1, dim2=2).reshape(-1)
        self.row_off, self.k_off = (pid * self.nn)[:, None], (pid * self.nn * self.nn)[:, None]
        self.ar = torch.arange(self.n, device=dev)
        self.qr, self.qc = (torch.tensor(t, device=dev) for t in (self.quad_rows, self.quad_cols))
        if sigma is not None:
            self.reset(sigma)

    def select(self, idx: Tensor) -> _SwapSearch:
        sub = _SwapSearch(self.K, self.pid[idx])
        sub.sigma, sub.h, sub.gain, sub.obj = self.sigma[idx], self.h[idx], self.gain[idx], self.obj[idx]
        return sub

    def assign(self, idx: Tensor, sub: _SwapSearch) -> None:
        self.sigma[idx], self.h[idx], self.gain[idx], self.obj[idx] = sub.sigma, sub.h, sub.gain, sub.obj

    @staticmethod
    def _take(flat: Tensor, idx: Tensor) -> Tensor:
        return flat.index_select(0, idx.reshape(-1)).view(idx.shape)  # faster than flat[idx] on CPU

    def _rows(self, pairs: Tensor) -> Tensor:
        """Rows of K at pairings ``(B, m)`` -> ``(B, m, N)``."""
        return self.krows.index_select(0, (self.row_off + pairs).reshape(-1)).view(*pairs.shape, self.nn)

    def reset(self, sigma: Tensor) -> None:
        """Start from assignments ``(B, n)``: h, objective, and all gains as ``W + W^T`` with
        ``W = hk[Q1] - 2 K[P1, Q1] - 2 K[P2, Q1] + hm[P1] + K[P1, P2] + K[Q1, Q2]`` (hk = 2h + diag K,
        hm = diag K - 2h); the entries in rows P of K come from the rows fetched for h."""
        b, n, nn = sigma.shape[0], self.n, self.nn
        self.sigma, a = sigma, self.ar * n + sigma
        rows = self._rows(a)  # (B, n, N): rows of K at the current pairings
        self.h = rows.sum(1)
        self.obj = self.h.gather(1, a).sum(1)
        r3 = rows.view(b, n, n, n)  # [r, j, c] = K[(r, sigma_r), (j, c)]
        k_pp = r3.gather(3, sigma[:, None, :, None].expand(-1, n, -1, 1))[..., 0]
        k_p2q1 = r3.gather(3, sigma[:, :, None, None].expand(-1, -1, n, 1))[..., 0].transpose(1, 2)
        k_p1q1 = r3.diagonal(dim1=1, dim2=2).gather(1, sigma[:, :, None].expand(-1, -1, n)).transpose(1, 2)
        q1 = self.ar[:, None] * n + sigma[:, None, :]  # (B, n, n): (r, sigma_s)
        k_qq = self._take(self.kflat, self.k_off + (q1 * nn + q1.transpose(1, 2)).view(b, -1)).view(b, n, n)
        kd = self._take(self.kd, self.row_off + torch.cat([q1.reshape(b, -1), a], 1))
        hq = 2 * self.h.gather(1, q1.reshape(b, -1)) + kd[:, : n * n]
        hp = kd[:, n * n :] - 2 * self.h.gather(1, a)
        w = hq.view(b, n, n) - 2 * (k_p1q1 + k_p2q1) + hp[:, :, None] + k_pp + k_qq
        self.gain = w + w.transpose(1, 2)
        self.gain.diagonal(dim1=1, dim2=2).fill_(float("-inf"))

    def _gains(self, r: Tensor) -> Tensor:
        """Gains of the swaps (r, s) for rows r ``(B, m)`` and all s -> ``(B, m, n)``."""
        b, n, sig = r.shape[0], self.n, self.sigma
        sr, ss = sig.gather(1, r)[..., None], sig[:, None, :]
        rn, sn = r[..., None] * n, self.ar * n
        idx = torch.stack(torch.broadcast_tensors(rn + ss, sn + sr, rn + sr, sn + ss), 1)  # (B, 4, m, n)
        flat = idx.view(b, -1)
        hv = self.h.gather(1, flat).view(idx.shape)
        kd = self._take(self.kd, self.row_off + flat).view(idx.shape)
        lin = kd.sum(1) + 2 * (hv[:, :2] - hv[:, 2:]).sum(1)
        kk = idx.index_select(1, self.qr) * self.nn + idx.index_select(1, self.qc)
        kv = self._take(self.kflat, self.k_off + kk.view(b, -1)).view(b, 6, *idx.shape[2:])
        return lin + 2 * (kv[:, :2].sum(1) - kv[:, 2:].sum(1))

    def step(self, u: Tensor, v: Tensor, apply: Tensor) -> None:
        """Swap rows u, v ``(B,)`` where ``apply`` ``(B,)`` holds; update h, the objective and the gains."""
        n, b = self.n, u.shape[0]
        gain_uv = self.gain.view(b, -1).gather(1, (u * n + v)[:, None])[:, 0]
        self.obj = self.obj + torch.where(apply, gain_uv, 0.0)
        v = torch.where(apply, v, u)  # a masked-out swap becomes the no-op swap (u, u): rho = 0 exactly
        uv = torch.stack([u, v], 1)
        su, sv = self.sigma.gather(1, uv).unbind(1)
        rows = self._rows(torch.stack([u * n + sv, v * n + su, u * n + su, v * n + sv], 1))
        rho = (rows[:, 0] + rows[:, 1]) - (rows[:, 2] + rows[:, 3])
        self.h = self.h + rho
        self.sigma = self.sigma.scatter(1, uv, torch.stack([sv, su], 1))
        p = rho.view(b, n, n).gather(2, self.sigma[:, None, :].expand(-1, n, -1))
        pd = p.diagonal(dim1=1, dim2=2)
        self.gain.add_(p + p.transpose(1, 2) - (pd[:, :, None] + pd[:, None, :]), alpha=2.0)
        fresh = self._gains(uv).masked_fill_(uv[..., None] == self.ar, float("-inf"))  # (B, 2, n)
        self.gain.scatter_(1, uv[..., None].expand(-1, -1, n), fresh)
        self.gain.scatter_(2, uv[:, None, :].expand(-1, n, -1), fresh.transpose(1, 2))

    def descend(self, max_iter: int, tol: Tensor, early_exit: bool | None = None) -> None:
        """Apply the best swap while its gain exceeds ``tol`` ``(B,)``, at most ``max_iter`` times.

        On CUDA converged searches are masked (no host sync); on CPU, where checking is free, the loop
        stops once all have converged and goes on with the unconverged subset once it is under half
        (``early_exit``; default: on CPU only).
        """
        early = not self.sigma.is_cuda if early_exit is None else early_exit
        for it in range(max_iter):
            flat = self.gain.view(self.sigma.shape[0], -1)
            best, idx = flat.max(1)  # max(dim): ~2x faster than argmax + gather on CPU
            imp = best > tol
            if early:
                active = imp.nonzero()[:, 0]
                if active.numel() == 0:
                    return
                if 2 * active.numel() < imp.numel():
                    sub = self.select(active)
                    sub.descend(max_iter - it, tol[active])
                    self.assign(active, sub)
                    return
            self.step(idx // self.n, idx % self.n, imp)

    def tabu(self, iters: int, generator: torch.Generator, tenure: tuple[int, int] | None = None) -> Tensor:
        """Robust tabu search (Taillard 1991) for ``iters`` swaps from the current assignments; returns the best
        assignments seen ``(B, n)`` (the start included, so never worse than it).

        Every iteration applies the best swap that is not tabu, improving or not: a local optimum is left
        through its least bad neighbour. After a swap each of the two rows may not return to the column it
        left for a random tenure in ``tenure`` (default ``[0.9 n, 1.1 n]``, Taillard's range); a swap is tabu
        when it would return *both* rows to such columns, unless it beats the best objective of its search
        (aspiration). Why not just more descents from more starts: on noise-dominated 16-node problems a
        tabu step finds better optima per swap than restarts (``benchmarks/qap_solver.py``). The loop runs a
        fixed count of masked batched steps: no host sync, the same on CPU and CUDA.
        """
        b, n, dev = self.sigma.shape[0], self.n, self.sigma.device
        lo, hi = tenure if tenure is not None else (max(1, (9 * n) // 10), max(2, (11 * n + 9) // 10))
        until = torch.zeros(b, n * n, dtype=torch.long, device=dev)  # row r may not take column c before it
        best_obj, best_sigma = self.obj.clone(), self.sigma.clone()
        for it in range(1, iters + 1):
            back = until.view(b, n, n).gather(2, self.sigma[:, None, :].expand(-1, n, -1)) > it  # [r, s]: r -> sigma_s
            barred = back & back.transpose(1, 2) & (self.gain <= (best_obj - self.obj)[:, None, None])
            best, idx = self.gain.masked_fill(barred, float("-inf")).view(b, -1).max(1)
            u, v = idx // n, idx % n
            left = torch.stack([u, v], 1)
            left = left * n + self.sigma.gather(1, left)  # (row, the column it leaves)
            until.scatter_(1, left, it + torch.randint(lo, hi + 1, (b, 2), generator=generator, device=dev))
            self.step(u, v, best > float("-inf"))
            better = self.obj > best_obj
            best_obj = torch.where(better, self.obj, best_obj)
            best_sigma = torch.where(better[:, None], self.sigma, best_sigma)
        return best_sigma


def _softassign(K: Tensor, betas: Tensor, iters: int, sinkhorn_iters: int) -> Tensor:
    """Softassign chains ``x <- Sinkhorn(exp(beta * standardise(K x)))`` from the uniform matrix, one per
    inverse temperature in ``betas``; all chains share each pass over K. Returns ``(G, S, n, n)``."""
    g, nn, _ = K.shape
    n, s = int(round(nn**0.5)), betas.shape[0]
    y = K.sum(2)[:, None] / n  # K x for the uniform x, shared by all chains (a row sum beats a bmm)
    x = y.expand(g, s, nn)
    for it in range(iters):
        if it:
            y = torch.bmm(x, K)  # (K x)^T per chain, K symmetric
        y = y.view(g, -1, n, n)
        y = (y - y.mean((2, 3), keepdim=True)) / (y.std((2, 3), keepdim=True, correction=0) + 1e-12)
        e = (betas[:, None, None] * (y - y.amax((2, 3), keepdim=True))).exp()
        for _ in range(sinkhorn_iters):
            e = e / e.sum(3, keepdim=True)
            e = e / e.sum(2, keepdim=True)
        x = e.view(g, s, nn)
    return x.reshape(g, s, n, n)


def _greedy_round(scores: Tensor) -> Tensor:
    """``(B, n, n)`` -> assignments ``(B, n)``: take the largest entry, drop its row and column, repeat."""
    b, n, _ = scores.shape
    sc, sigma = scores.clone(), torch.zeros(b, n, dtype=torch.long, device=scores.device)
    for _ in range(n):
        idx = sc.view(b, -1).max(1, keepdim=True).indices
        r, c = idx // n, idx % n
        sigma.scatter_(1, r, c)
        sc.scatter_(1, r[:, :, None].expand(-1, -1, n), float("-inf"))
        sc.scatter_(2, c[:, None, :].expand(-1, n, -1), float("-inf"))
    return sigma


def lvmmed_qap(
    K: Tensor,
    n: int,
    *,
    betas: tuple[float, ...] = (1.0, 2.0, 4.0),
    softassign_iters: int = 4,
    sinkhorn_iters: int = 3,
    num_random_starts: int | None = None,
    max_iter: int | None = None,
    tabu_iters: int = 0,
    tabu_searches: int = 1,
    seed: int = 0,
    early_exit: bool | None = None,
) -> Tensor:
    """Our batched QAP heuristic: several starts per problem, 2-swap local search from each, the best wins.

    Starts: the exact LAP on the vertex term (so the result is never below the LAP rounding; good when the
    vertex term dominates), one softassign chain per ``betas`` entry, greedily rounded (good when the edge
    term dominates), and ``num_random_starts`` seeded random permutations (default ``5 (16/n)^3 - 5``
    clipped to [0, 64]: a descent costs ~n^3, so none at 16 nodes and more for the cheap, rugged small
    problems). Each start descends to a 2-swap local optimum (:class:`_SwapSearch`, at most ``max_iter``
    swaps, default 4n). ``tabu_iters`` > 0 then continues the ``tabu_searches`` best local optima of each
    problem with that many robust tabu swaps (:meth:`_SwapSearch.tabu`): slower, closer to the optimum on
    noise-dominated problems. Deterministic for a given ``seed``. ``early_exit`` (default: on CPU only) lets loops
    stop on a host-side convergence check; without it they run sync-free with masks, as on CUDA.
    ``K`` ``(G, n*n, n*n)`` -> ``(G, n, n)``.
    """
    g, dev = K.shape[0], K.device
    if tabu_iters < 0 or tabu_searches < 1:
        raise ValueError(f"need tabu_iters >= 0 and tabu_searches >= 1, got {tabu_iters} and {tabu_searches}")
    max_iter = 4 * n if max_iter is None else max_iter
    if num_random_starts is None:
        num_random_starts = min(64, max(0, int(5 * (16 / n) ** 3) - 5))
    kd = torch.diagonal(K, dim1=1, dim2=2)
    lap = hungarian_batched(-kd.reshape(g, n, n).to(torch.float64), early_exit).argmax(2)[:, None]
    starts = [lap]
    if len(betas) and softassign_iters > 0:
        beta = torch.tensor(betas, dtype=K.dtype, device=dev)
        soft = _softassign(K, beta, softassign_iters, sinkhorn_iters)
        starts.append(_greedy_round(soft.reshape(-1, n, n)).view(g, -1, n))
    gen = torch.Generator(device=dev).manual_seed(seed)
    starts.append(torch.rand(g, num_random_starts, n, generator=gen, device=dev).argsort(-1))
    starts = torch.cat(starts, 1)
    s = starts.shape[1]
    search = _SwapSearch(K, torch.arange(g, device=dev).repeat_interleave(s), starts.view(-1, n))
    scale = kd.abs().amax(1) + search.h.view(g, s, -1).abs().amax((1, 2))
    search.descend(max_iter, 1e-5 * scale.repeat_interleave(s) + 1e-30, early_exit)
    m = min(tabu_searches, s) if tabu_iters > 0 else 1
    obj_s = search.obj.view(g, s)
    winners = obj_s.argmax(1, keepdim=True) if m == 1 else obj_s.topk(m, 1).indices  # (G, m)
    best = search.sigma.view(g, s, n).gather(1, winners[..., None].expand(-1, -1, n))
    if tabu_iters > 0:
        flat = (winners + torch.arange(g, device=dev)[:, None] * s).view(-1)
        best = search.select(flat).tabu(tabu_iters, gen).view(g, m, n)
    # exact objectives of the winners and of the untouched LAP start guard against float drift in the gains
    cand = torch.cat([best, lap], 1)
    c = cand.shape[1]
    a = torch.arange(n, device=dev) * n + cand  # (G, c, n) pairings; x^T K x = sum_rs K[a_r, a_s]
    obj = K.reshape(g, -1).gather(1, (a[..., :, None] * n * n + a[..., None, :]).view(g, -1))
    pick = obj.view(g, c, n * n).sum(2).argmax(1)
    sigma = cand.gather(1, pick[:, None, None].expand(-1, 1, n))[:, 0]
    return torch.nn.functional.one_hot(sigma, n).to(K.dtype)


def _lap_on_vertex_term(K: Tensor, n: int) -> Tensor:
    return hungarian_batched(-torch.diagonal(K, dim1=1, dim2=2).reshape(-1, n, n).to(torch.float64))


def _pygm(name: str) -> Callable[..., Tensor]:
    def solve(K: Tensor, n: int, **options: object) -> Tensor:
        import pygmtools

        pygmtools.BACKEND = "pytorch"
        # rrwm/ipfp/sm assume non-negative affinities: shifting every entry by -min(K) adds the same
        # n^2 * shift to the objective of every permutation matrix, so the optimum is unchanged.
        shifted = K - K.amin(dim=(1, 2), keepdim=True)
        # pygmtools vectorises X column-major (p = a * n + i): for square problems our row-major K is the
        # same problem with the graphs' roles swapped, so its solution is our X transposed.
        soft = getattr(pygmtools, name)(shifted, n1max=n, n2max=n, backend="pytorch", **options)
        return hungarian_batched(-soft.transpose(1, 2).to(torch.float64))

    solve.__doc__ = f"pygmtools.{name} on K shifted to non-negative, rounded by the batched Hungarian."
    return solve


# QAP solvers by name: fn(K, n, **options) -> X; add one with QAP_SOLVERS.register(name, fn), not by editing
# solve_qap.
QAP_SOLVERS = Registry("QAP solver", {
    "lvmmed": lvmmed_qap,
    "lap": _lap_on_vertex_term,
    "rrwm": _pygm("rrwm"),
    "ipfp": _pygm("ipfp"),
    "sm": _pygm("sm"),
})


def solve_qap(K: Tensor, n: int, method: str = "lvmmed", check_inputs: bool = True, **options: object) -> Tensor:
    """Approximately maximise ``x^T K x`` over permutation matrices (Eq. 4: GM(c^v, c^e)).

    Args:
        K: ``(G, n*n, n*n)`` symmetric dense Lawler matrix, e.g. from :func:`lawler_from_edges` (for any
            other K pass ``(K + K^T) / 2``: same objective); float16/bfloat16 are upcast to float32.
        n: nodes per graph.
        method: ``"lvmmed"`` (:func:`lvmmed_qap`), ``"lap"`` (exact LAP on the diagonal of K only), or
            pygmtools' ``"rrwm"``, ``"ipfp"``, ``"sm"`` (see :data:`QAP_SOLVERS`).
        check_inputs: check that K is finite and symmetric (one host sync; shapes are always checked).
        options: keyword options of the solver (e.g. ``num_random_starts``; ``max_iter`` for pygmtools).

    Returns:
        ``(G, n, n)`` float32 0/1 permutation matrices on K's device.
    """
    if method not in QAP_SOLVERS:
        raise ValueError(f"unknown QAP method {method!r}; valid methods: {sorted(QAP_SOLVERS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if K.dim() != 3 or K.shape[1] != K.shape[2]:
        raise ValueError(f"K must be a batch of square matrices (G, n*n, n*n), got {tuple(K.shape)}")
    if K.shape[1] != n * n:
        raise ValueError(f"K has {K.shape[1]} pairings per problem but n*n = {n * n} for n = {n}")
    if not K.is_floating_point():
        raise ValueError(f"K must be a floating-point tensor, got {K.dtype}")
    K = K.detach().float() if K.dtype in (torch.float16, torch.bfloat16) else K.detach()
    if K.shape[0] == 0:
        return K.new_zeros(0, n, n, dtype=torch.float32)
    if check_inputs:
        _check_lawler(K, n)
    return QAP_SOLVERS[method](K, n, **options).to(torch.float32)


def _check_lawler(K: Tensor, n: int) -> None:
    """One host sync: all entries finite (NaN propagates through aminmax), K symmetric on two spot-checked rows."""
    lo, hi = torch.aminmax(K)
    rows = torch.tensor([0, (n * n) // 2], device=K.device)
    asym = (K.index_select(1, rows) - K.index_select(2, rows).transpose(1, 2)).abs().amax()
    ok = torch.stack([lo.isfinite() & hi.isfinite(), asym <= 1e-5 * hi.abs().maximum(lo.abs())])
    finite, symmetric = ok.tolist()
    if not finite:
        raise ValueError("K contains NaN or inf values; graph matching needs finite affinities: check the "
                         "features K was built from (lawler_from_edges) for NaN/Inf, e.g. a diverged encoder")
    if not symmetric:
        raise ValueError("K must be symmetric (the Lawler form of lawler_from_edges); pass (K + K^T) / 2")
