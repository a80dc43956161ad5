"""Gradients through the graph-matching solver with IMLE (Sec. 3.2.4, Eq. 5-6, Algorithm 1).

The matching ``GM(c_v, c_e)`` (Eq. 4) is piecewise constant in the affinities, so its true gradient is zero
almost everywhere. IMLE (Niepert et al. 2021) perturbs the costs with Gumbel noise in the forward pass and,
in the backward pass, solves again at costs moved by ``-lam * dL/dX``; the difference of the two matchings,
divided by ``lam``, is the gradient estimate (Eq. 6).

``step`` says what ``lam`` is relative to. ``"per_loss"`` is IMLE as written for one loss: the target moves by
``lam * dL/dX``, so a loss averaged over ``G`` graphs (and over processes) moves each graph's target by
``lam / G``: 40 at batch 32, 0.4 at the paper's 3200. ``"per_graph"`` reads Algorithm 1 for each problem: each
graph's ``dL/dX`` is rescaled to unit mean magnitude before the step (for the Hamming loss, exactly the
graph's own ``dH/dX``, whatever the reduction, batch size or number of processes) and the gradient estimate
is scaled back, so it is still an estimate of ``dL/dc``.

Noise: a ``torch.Generator`` draws the batch's noise in one stream, so a graph's noise depends on where it sits in
the batch and on the process that solves it. A :class:`NoiseKey` instead makes every graph's noise a function of
``(seed, global graph index, stream)`` alone (a counter-based generator, :func:`counter_uniform`), so a global
batch gets the same noise on 1 process or on N (DDP exact with the noise on) and on CPU or GPU alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lvmmed_monai.ssl.matching import lawler_edges, pair_products, solve_lap, solve_qap

__all__ = ["imle_qap", "hamming_loss", "gumbel_noise", "IMLESettings", "NOISE_KINDS", "STEP_KINDS", "NoiseKey",
           "counter_uniform"]

NOISE_KINDS = ("gumbel", "constant", "none")
STEP_KINDS = ("per_graph", "per_loss")


def gumbel_noise(shape: tuple[int, ...], ref: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gumbel(0, 1) samples ``-log(-log(U))`` with U uniform in (0, 1), float32 on ``ref``'s device."""
    return _gumbel(torch.rand(shape, generator=generator, device=ref.device, dtype=torch.float32))


def _gumbel(u: Tensor) -> Tensor:
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection of 32-bit integers that mixes every bit into every bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_uniform(keys: Tensor, count: int) -> Tensor:
    """``(G, count)`` float32 uniforms in (0, 1): element ``j`` of row ``g`` is a hash of ``(keys[g], j)`` only.

    SplitMix-style: a Weyl sequence ``key + j * golden`` through :func:`_fmix32`; 23 bits per value. Integer
    ops only, so the values are identical on every device and process, and a row never depends on the rows
    around it. torch's Philox generators would give the same property on CUDA only, and per-row generators
    would need a Python loop over graphs.
    """
    j = torch.arange(count, device=keys.device, dtype=torch.int64)
    h = _fmix32((keys.long()[:, None] + _mul32(j, 0x9E3779B9)[None]) & _MASK32)
    return ((h >> 9).float() + 0.5) / float(1 << 23)  # 23 bits: 1 - 2**-24 is the largest, < 1 in float32


@dataclass(frozen=True)
class NoiseKey:
    """The noise of one step as a function of ``(seed, global graph index, stream)``: pass it as ``generator``.

    ``seed``: this step's seed (the trainer's ``derive_seed(seed, iteration)``); ``graph_offset``: the global
    index of this process's first graph (``rank * graphs per process``); ``stream``: a separate draw for each
    matching of the step (e.g. one per multi-crop view). Graph ``g`` of a call gets the same noise whichever
    process solves it.
    """

    seed: int
    graph_offset: int = 0
    stream: int = 0

    def keys(self, num_graphs: int, device: torch.device | str) -> Tensor:
        """``(num_graphs,)`` int64 32-bit keys of this call's graphs."""
        graphs = torch.arange(num_graphs, device=device, dtype=torch.int64) + int(self.graph_offset)
        k = _fmix32(torch.full_like(graphs, int(self.seed) & _MASK32))
        k = _fmix32(k ^ _mul32(graphs & _MASK32, 0x27D4EB2F))
        return _fmix32(k ^ (int(self.stream) * 0x165667B1 & _MASK32))

    def substream(self, stream: int) -> NoiseKey:
        return NoiseKey(self.seed, self.graph_offset, int(stream))


@dataclass(frozen=True)
class IMLESettings:
    """What one :func:`imle_qap` call solves with (see its arguments); fixed for the call's forward and backward."""

    lam: float
    step: str
    noise: str
    noise_scale: float
    num_samples: int
    method: str
    second_order: bool
    constant: float
    check_inputs: bool
    c_v_dtype: torch.dtype
    c_e_dtype: torch.dtype
    solver_options: dict = field(default_factory=dict)


class _IMLEQAP(torch.autograd.Function):
    """Algorithm 1: the forward pass solves the perturbed matching, the backward pass the target one."""

    @staticmethod
    def forward(ctx: Any, c_v: Tensor, c_e: Tensor, edges_s: Tensor, edges_t: Tensor, cfg: IMLESettings,
                generator: torch.Generator | NoiseKey | None) -> Tensor:
        s, (g, n, _) = cfg.num_samples, c_v.shape
        cv, ce = c_v.detach().float(), c_e.detach().float()
        if cfg.noise == "gumbel" and isinstance(generator, NoiseKey):  # per graph: the vertex part, then the edges'
            tau, per_v, per_e = cfg.noise_scale, s * n * n, s * ce.shape[1] * ce.shape[2]
            u = counter_uniform(generator.keys(g, cv.device), per_v + (per_e if cfg.second_order else 0))
            eps = tau * _gumbel(u[:, :per_v]).view(g, s, n, n).transpose(0, 1)
            eps_e = tau * _gumbel(u[:, per_v:]).view(g, s, *ce.shape[1:]).transpose(0, 1) if cfg.second_order \
                else None
        elif cfg.noise == "gumbel":
            tau = cfg.noise_scale
            eps = tau * gumbel_noise((s, g, n, n), cv, generator)
            eps_e = tau * gumbel_noise((s, *ce.shape), cv, generator) if cfg.second_order else None
        else:
            value = cfg.noise_scale * cfg.constant if cfg.noise == "constant" else 0.0
            eps = cv.new_full((s, g, n, n), value)
            eps_e = ce.new_full((s, *ce.shape), value) if cfg.second_order else None
        # the edge part of the Lawler matrix is the same in the forward and the backward solve: built once
        edge_part = _edge_part(ce + eps_e, edges_s, edges_t, n, cfg) if eps_e is not None else None
        x = _solve(cv + eps, edge_part, cfg)
        ctx.cfg = cfg
        ctx.save_for_backward(cv, eps, x, edges_s, edges_t, *(() if edge_part is None else (edge_part,)))
        return x[0].to(c_v.dtype)

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor) -> tuple[Tensor | None, ...]:
        cv, eps, x_fwd, edges_s, edges_t, *edge_part = ctx.saved_tensors
        cfg = ctx.cfg
        lam = cfg.lam
        grad_x = grad_x.float()
        scale = grad_x.new_ones(grad_x.shape[0], 1, 1)  # (G, 1, 1): what lam is relative to, per graph
        if cfg.step == "per_graph":
            scale = grad_x.abs().mean((1, 2), keepdim=True)
            grad_x = torch.where(scale > 0, grad_x / scale.clamp_min(1e-30), torch.zeros_like(grad_x))
        # (c_v + eps, c_e + eps') - lam * dL/dX: the loss depends on X only, so only the vertex term moves
        target_v = cv + eps - lam * grad_x
        x_bwd = _solve(target_v, edge_part[0] if edge_part else None, cfg)
        grad_v = grad_e = None
        if ctx.needs_input_grad[0]:
            grad_v = ((x_fwd - x_bwd).mean(0) * scale / lam).to(cfg.c_v_dtype)
        if ctx.needs_input_grad[1]:
            if cfg.second_order:
                diff = pair_products(x_fwd, edges_s, edges_t) - pair_products(x_bwd, edges_s, edges_t)
                grad_e = diff.mean(0) * scale / lam
            else:
                grad_e = cv.new_zeros(cv.shape[0], edges_s.shape[1], edges_t.shape[1])
            grad_e = grad_e.to(cfg.c_e_dtype)
        return grad_v, grad_e, None, None, None, None


def _edge_part(e: Tensor, edges_s: Tensor, edges_t: Tensor, n: int, cfg: IMLESettings) -> Tensor:
    """Edge part of the Lawler matrices of S noise samples: ``e`` (S, G, E, F) -> (S * G, n*n, n*n)."""
    s, g = e.shape[:2]
    rep = (s, 1, 1)
    return lawler_edges(e.reshape(s * g, *e.shape[2:]), edges_s.repeat(rep), edges_t.repeat(rep), n,
                        check_indices=cfg.check_inputs)


def _solve(v: Tensor, edge_part: Tensor | None, cfg: IMLESettings) -> Tensor:
    """Matchings for S noise samples at once: ``v`` (S, G, n, n) and the edge part of their Lawler matrices
    (S * G, n*n, n*n), or None for the LAP ablation -> (S, G, n, n)."""
    s, g, n, _ = v.shape
    if edge_part is None:  # "w/o second-order" ablation: the LAP on the vertex term
        return solve_lap(v.reshape(s * g, n, n)).view(s, g, n, n)
    K = edge_part + torch.diag_embed(v.reshape(s * g, n * n))
    return solve_qap(K, n, method=cfg.method, check_inputs=cfg.check_inputs, **cfg.solver_options).view(s, g, n, n)


def imle_qap(
    c_v: Tensor,
    c_e: Tensor,
    edges_s: Tensor,
    edges_t: Tensor,
    *,
    lam: float = 80.0,
    step: str = "per_loss",
    noise: str = "gumbel",
    noise_scale: float = 1.0,
    num_samples: int = 1,
    second_order: bool = True,
    method: str = "lvmmed",
    constant: float = 0.5772156649,
    generator: torch.Generator | NoiseKey | None = None,
    solver_options: dict | None = None,
    check_inputs: bool = True,
) -> Tensor:
    """Perturbed graph matching ``GM(c_v + eps, c_e + eps')`` with IMLE gradients (Eq. 6, Algorithm 1).

    Args:
        c_v: ``(G, n, n)`` vertex affinities; c_e: ``(G, E, F)`` edge affinities over the directed edges
            ``edges_s`` ``(G, E, 2)`` and ``edges_t`` ``(G, F, 2)`` (long), as in
            :func:`~lvmmed_monai.ssl.matching.lawler_from_edges`.
        lam: the finite-difference step lambda (80 in the paper). The backward target is
            ``c + eps - lam * dL/dX``, so with ``step="per_loss"`` lam is relative to the scale of dL/dX: a
            loss averaged over G graphs perturbs each by ``lam / G``.
        step: ``"per_loss"`` (IMLE as written for one loss) or ``"per_graph"`` (each graph's dL/dX rescaled
            to unit mean magnitude before the step, the gradient scaled back: each graph moves by lam
            whatever the batch; see the module docstring).
        noise: ``"gumbel"`` (eps, eps' ~ Gumbel(0, 1), Algorithm 1), ``"constant"`` (the paper's "w/o
            Gumbel" ablation: ``constant`` is added to every c_v and c_e entry; the default is the Gumbel
            mean, so only the randomness is removed) or ``"none"``.
        noise_scale: temperature ``tau`` of the perturbation, ``eps = tau * Gumbel(0, 1)`` (IMLE's ``tau``;
            the paper uses 1). It sets how far the affinities must separate before the perturbed matching
            follows them: affinities are cosines, so tau = 1 swamps the small margins of features at
            random initialisation (see docs/ssl.md); "constant" noise is scaled alike.
        num_samples: independent noise samples S. Each is solved in the forward and again in the backward
            pass (all S * G problems in one batched call); the gradient is the Monte-Carlo mean of the S
            single-sample estimates. The forward returns the first sample's matching (a 0/1 matching, not
            an average, so the Hamming loss stays Eq. 5), and its ``dL/dX`` sets every sample's backward
            target; for the Hamming loss dL/dX = 1 - 2 X* does not depend on X, so this is exact there.
        second_order: False is the "w/o second-order" ablation: the exact LAP on ``c_v + eps`` only; c_e
            then gets a zero gradient.
        method: QAP solver of :func:`~lvmmed_monai.ssl.matching.solve_qap`; solver_options go to it.
        generator: optional torch.Generator (on c_v's device) for reproducible noise, or a :class:`NoiseKey`:
            each graph's noise from ``(seed, global graph index, stream)``, the same on any number of processes.
        check_inputs: check c_v, c_e for NaN/Inf and the edges' node indices (host syncs; shapes and dtypes
            are always checked).

    Returns:
        ``(G, n, n)`` 0/1 matching in c_v's dtype. Backward: ``dL/dc_v = mean_s (X_fwd - X_bwd) / lam`` and
        ``dL/dc_e[e, f] = mean_s (X_fwd[i_e, a_f] X_fwd[j_e, b_f] - X_bwd[i_e, a_f] X_bwd[j_e, b_f]) / lam``
        (the derivative of the objective ``sum c_v X + sum c_e X X`` w.r.t. c_e[e, f] is the product of the
        two pair indicators). GM maximises the objective and the loss is minimised, so gradient descent on
        the Hamming loss to the identity raises the diagonal of c_v.
    """
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise {noise!r}; valid: {list(NOISE_KINDS)}")
    if step not in STEP_KINDS:
        raise ValueError(f"unknown IMLE step {step!r}; valid: {list(STEP_KINDS)}")
    if num_samples < 1 or lam <= 0 or noise_scale < 0:
        raise ValueError(f"need num_samples >= 1, lam > 0 and noise_scale >= 0, got num_samples={num_samples}, "
                         f"lam={lam}, noise_scale={noise_scale}")
    if c_v.dim() != 3 or c_v.shape[1] != c_v.shape[2]:
        raise ValueError(f"c_v must have shape (G, n, n), got {tuple(c_v.shape)}")
    if c_e.dim() != 3 or c_e.shape[0] != c_v.shape[0]:
        raise ValueError(f"c_e must have shape (G, E, F) with G = {c_v.shape[0]}, got {tuple(c_e.shape)}")
    if not (c_v.is_floating_point() and c_e.is_floating_point()):
        raise ValueError(f"c_v and c_e must be floating point, got {c_v.dtype} and {c_e.dtype}")
    if check_inputs and (not bool(torch.isfinite(c_v).all()) or not bool(torch.isfinite(c_e).all())):
        raise ValueError("c_v or c_e contains NaN or inf values")
    cfg = IMLESettings(
        lam=float(lam), step=step, noise=noise, noise_scale=float(noise_scale), num_samples=int(num_samples),
        method=method, second_order=bool(second_order), constant=float(constant), check_inputs=bool(check_inputs),
        c_v_dtype=c_v.dtype, c_e_dtype=c_e.dtype, solver_options=dict(solver_options or {}),
    )
    return _IMLEQAP.apply(c_v, c_e, edges_s.long(), edges_t.long(), cfg, generator)


def hamming_loss(X: Tensor, target: Tensor | None = None) -> Tensor:
    """Eq. 5 per graph, ``(G,)``: ``sum X * (1 - X*) + X* * (1 - X)`` with X* the identity by default.

    X: ``(G, n, n)`` matchings; target: ``(G, n, n)`` or ``(n, n)``. Callers reduce (mean or sum).
    """
    if X.dim() != 3:
        raise ValueError(f"X must have shape (G, n, n), got {tuple(X.shape)}")
    if target is None:
        target = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    elif target.shape[-2:] != X.shape[-2:]:
        raise ValueError(f"target {tuple(target.shape)} does not match X {tuple(X.shape)}")
    target = target.to(X.dtype)
    return (X * (1 - target) + target * (1 - X)).sum((-2, -1))
