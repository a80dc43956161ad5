"""Joint 2D-3D self-supervised tasks (AAAI 2023, Eq. 1-15) on the hybrid backbone, and its training stages.

* :func:`sinkhorn`: SwAV's equipartitioned codes (Eq. 2), log-domain for stability;
* :class:`ClusteringAgreementLoss`: swapped code prediction between two views (Eq. 3-4), used for slices
  (``L_2D``, Eq. 5) and for volume embeddings (``L_3D``, Eq. 10-12); ``hard_codes`` for the
  DeepCluster-v2 flavour;
* :class:`MaskedSliceModeling`: 10% of a volume's slice embeddings replaced by a learnable MASK token,
  an FC decoder predicting them from f_inter's outputs, L2 (Eq. 13-15);
* :class:`Joint3DLoss`: the three terms (and optionally LVM-Med's graph-matching loss on the slices)
  with configurable weights; :func:`set_training_stage`: the paper's three stages.

Nothing here knows about bundles or engines: a loss takes the network and two views and returns a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvmmed_monai.ssl.loss import LVMMedLoss

__all__ = ["sinkhorn", "ClusteringAgreementLoss", "MaskedSliceModeling", "Joint3DLoss", "Joint3DOutput",
           "set_training_stage", "stage_weights", "TERMS"]

TERMS = ("intra", "inter", "mask", "graph_matching")


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes ``Q`` for ``scores (N, K)`` (sample-prototype similarities), Eq. 2 solved as in SwAV.

    Maximises ``Tr(Q^T C^T Z) + eps H(Q)`` over the transport polytope by ``iterations`` Sinkhorn-Knopp
    steps, each ending on the per-sample normalisation. Returned scaled by ``N`` as SwAV does, so every
    row (sample) sums to 1 exactly (a distribution over the ``K`` clusters) and every column (cluster) to
    ``N / K`` once converged: clusters are used equally (the paper's ``Q 1 = 1/K``, ``Q^T 1 = 1/B`` before
    the scaling). Computed in log space in float32 or wider (``exp(score / 0.05)`` overflows half).
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be (N >= 1, K), got {tuple(scores.shape)}")
    n, k = scores.shape
    log_q = scores.to(torch.promote_types(scores.dtype, torch.float32)) / epsilon
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # clusters: 1/K each
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # samples: 1/N each
    return (log_q + math.log(n)).exp()


class ClusteringAgreementLoss(nn.Module):
    """SwAV-style clustering agreement between two views (Eq. 1-4; Eq. 10-11 with volume embeddings).

    ``z = normalize(projector(features))`` (Eq. 1 / 10), prototypes ``C`` (unit rows), codes ``q`` from
    :func:`sinkhorn` on the detached scores, ``l(z, q) = -sum_k q^k log softmax(z^T c_k / tau)`` (Eq. 4) and
    ``L = l(z_t, q_s) + l(z_s, q_t)`` averaged over samples (Eq. 3). Eq. 11 as printed pairs each view with
    its *own* code, which has no term linking the views; ``swapped=False`` gives that literal form, the
    default follows Eq. 3, which Eq. 11 says it generalises.

    Args:
        in_dim: feature width. proj_dim / hidden_dim: projector ``Linear -> LayerNorm -> ReLU -> Linear``
            (LayerNorm, not SwAV's BatchNorm, so that a batch of a few volumes works; None = one Linear).
        num_prototypes: ``K`` (SwAV: 3000). temperature: ``tau`` (0.1). epsilon / sinkhorn_iterations: Eq. 2.
        hard_codes: one-hot argmax of the balanced codes as targets, the online form of DeepCluster-v2's
            equal-size hard assignments (DeepCluster-v2 proper runs k-means on a memory bank each epoch).
        queue_size: SwAV's feature queue (0 = off). The codes of a batch are computed by Sinkhorn over the
            batch *and* the ``queue_size`` most recent projections of earlier batches (per view, scored against
            the current prototypes), so the equal-partition constraint acts on many images: on a batch of a
            few volumes' near-duplicate slices alone it forces near-uniform codes. Used once full (as SwAV);
            filled in training mode only; saved in the state dict (``queue``, ``queue_count``) so a resumed
            run continues with it. The paper clusters 1024 slices per step (12 volumes per batch).
    """

    def __init__(self, in_dim: int, num_prototypes: int = 3000, proj_dim: int = 128, hidden_dim: int | None = 2048,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 hard_codes: bool = False, swapped: bool = True, queue_size: int = 0) -> None:
        super().__init__()
        if num_prototypes < 1 or temperature <= 0 or epsilon <= 0 or queue_size < 0:
            raise ValueError(f"need num_prototypes >= 1, temperature > 0, epsilon > 0, queue_size >= 0; got "
                             f"{num_prototypes}, {temperature}, {epsilon}, {queue_size}")
        if hidden_dim:
            self.projector: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim),
                                                      nn.ReLU(inplace=True), nn.Linear(hidden_dim, proj_dim))
        else:
            self.projector = nn.Linear(in_dim, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.in_dim, self.temperature, self.epsilon, self.iterations = in_dim, temperature, epsilon, sinkhorn_iterations
        self.hard_codes, self.swapped, self.queue_size = hard_codes, swapped, int(queue_size)
        if self.queue_size:  # two views' projections, newest first; how many rows hold real entries
            self.register_buffer("queue", torch.zeros(2, self.queue_size, proj_dim))
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    def embed(self, features: Tensor) -> Tensor:
        """``(N, in_dim)`` -> normalised projections ``(N, proj_dim)``."""
        return F.normalize(self.projector(features), dim=1)

    def scores(self, features: Tensor) -> Tensor:
        """``(N, in_dim)`` -> cosine scores ``(N, K)`` of the normalised projections against the prototypes."""
        return self._scores(self.embed(features))

    def _scores(self, z: Tensor) -> Tensor:
        return z @ F.normalize(self.prototypes.weight, dim=1).t()

    def codes(self, scores: Tensor, view: int | None = None) -> Tensor:
        """Codes of ``scores (N, K)``; with a full queue and ``view`` given, Sinkhorn runs over that view's queue
        and the batch together and the batch's rows are returned."""
        scores = scores.detach()
        n = scores.shape[0]
        if view is not None and self.queue_size and int(self.queue_count) >= self.queue_size:
            with torch.no_grad():
                scores = torch.cat([self._scores(self.queue[view].to(scores.dtype)), scores])
        q = sinkhorn(scores, self.epsilon, self.iterations)[-n:]  # rows sum to 1 with or without the queue
        return F.one_hot(q.argmax(1), q.shape[1]).to(q.dtype) if self.hard_codes else q

    @torch.no_grad()
    def _enqueue(self, z_s: Tensor, z_t: Tensor) -> None:
        """Newest first, as SwAV: shift the queue by the batch and put the batch's projections in front."""
        n = min(z_s.shape[0], self.queue_size)
        for view, z in enumerate((z_s, z_t)):
            self.queue[view] = torch.cat([z[:n].detach().to(self.queue.dtype), self.queue[view, : self.queue_size - n]])
        self.queue_count.add_(z_s.shape[0])

    def forward(self, feats_s: Tensor, feats_t: Tensor) -> Tensor:
        """``feats_s``, ``feats_t``: ``(N, in_dim)``, row ``i`` of both from the same slice / volume."""
        if feats_s.shape != feats_t.shape or feats_s.dim() != 2 or feats_s.shape[1] != self.in_dim:
            raise ValueError(f"expected two paired (N, {self.in_dim}) feature batches, got {tuple(feats_s.shape)} "
                             f"and {tuple(feats_t.shape)}")
        z_s, z_t = self.embed(feats_s), self.embed(feats_t)
        s, t = self._scores(z_s), self._scores(z_t)
        q_s, q_t = self.codes(s, view=0), self.codes(t, view=1)
        if self.queue_size and self.training:
            self._enqueue(z_s, z_t)
        logp_s, logp_t = F.log_softmax(s / self.temperature, dim=1), F.log_softmax(t / self.temperature, dim=1)
        if self.swapped:
            return -(q_s * logp_t).sum(1).mean() - (q_t * logp_s).sum(1).mean()
        return -(q_t * logp_t).sum(1).mean() - (q_s * logp_s).sum(1).mean()


class MaskedSliceModeling(nn.Module):
    """Masked slice-embedding prediction (Eq. 13-15): the MASK token and the FC decoder ``f_decode``.

    ``sample_mask`` picks ``max(1, round(mask_ratio * L))`` real slices of each volume; ``mask_inputs``
    replaces their embeddings by MASK (Eq. 13); ``loss`` decodes f_inter's last output at the masked
    slices (Eq. 14) and averages ``||y_i - f_decode(h_i)||_2`` over them (Eq. 15: an L2 norm per slice, not
    squared; targets detached, as Eq. 15 optimises f_inter and f_decode only).
    """

    def __init__(self, embed_dim: int, inter_dim: int, mask_ratio: float = 0.1) -> None:
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(inter_dim, embed_dim)

    def sample_mask(self, key_padding_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B, D)`` bool, True at the slices to mask (never at padded ones)."""
        lengths = (~key_padding_mask).sum(1)
        count = (lengths.float() * self.mask_ratio).round().long().clamp(min=1)
        noise = torch.rand(key_padding_mask.shape, generator=generator, device=key_padding_mask.device)
        rank = noise.masked_fill(key_padding_mask, 2.0).argsort(1).argsort(1)
        return rank < count[:, None]

    def mask_inputs(self, y: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask.unsqueeze(-1), self.mask_token.to(y.dtype), y)

    def loss(self, h: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """``h (B, D, inter_dim)`` f_inter's output on masked inputs, ``target (B, D, embed_dim)`` the unmasked
        slice embeddings, ``mask (B, D)``."""
        pred = self.decoder(h[mask])
        return (pred - target[mask].detach()).norm(dim=1).mean()


class Joint3DOutput(NamedTuple):
    """``loss`` and the detached value of each computed term (``terms``)."""

    loss: Tensor
    terms: dict[str, Tensor]


def stage_weights(stage: int) -> dict[str, float]:
    """The paper's terms per stage: 1 = L_2D (Eq. 5), 2 = L_mask (Eq. 15), 3 = L_3D (Eq. 12)."""
    table = {1: {"intra": 1.0}, 2: {"mask": 1.0}, 3: {"inter": 1.0}}
    if stage not in table:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    return table[stage]


class Joint3DLoss(nn.Module):
    """Weighted sum of the joint 2D-3D terms for two views of a batch of volumes.

    ``forward(net, view_s, view_t, lengths)`` with ``net`` a hybrid network (``slice_embeddings``,
    ``inter``: :class:`~lvmmed_monai.networks.hybrid.LVMMedHybridBackbone` or the seg / cls networks) and
    two augmentations ``(B, C, D, H, W)`` of the same volumes, slice ``i`` of both views from slice ``i``.
    Terms (``weights`` keys, zero or absent = not computed): ``intra`` (slices, Eq. 5), ``inter`` (volumes,
    Eq. 12), ``mask`` (Eq. 15, both views), ``graph_matching`` (``graph_matching``, e.g. ``LVMMedLoss``, on
    the last encoder maps of the real slices; its batch and ``coords_*`` rules apply). ``queue_size`` /
    ``volume_queue_size``: SwAV feature queues of the slice (``intra``) and volume (``inter``) clustering terms
    (see :class:`ClusteringAgreementLoss`; 0 = off).
    """

    def __init__(self, embed_dim: int, inter_dim: int, weights: Mapping[str, float] | None = None,
                 num_prototypes: int = 3000, proj_dim: int = 128, hidden_dim: int | None = 2048,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 hard_codes: bool = False, mask_ratio: float = 0.1, graph_matching: LVMMedLoss | None = None,
                 queue_size: int = 0, volume_queue_size: int = 0) -> None:
        super().__init__()
        kw = {"num_prototypes": num_prototypes, "proj_dim": proj_dim, "hidden_dim": hidden_dim,
              "temperature": temperature, "epsilon": epsilon, "sinkhorn_iterations": sinkhorn_iterations,
              "hard_codes": hard_codes}
        self.intra = ClusteringAgreementLoss(embed_dim, queue_size=queue_size, **kw)
        self.inter = ClusteringAgreementLoss(inter_dim, queue_size=volume_queue_size, **kw)
        self.masked = MaskedSliceModeling(embed_dim, inter_dim, mask_ratio)
        self.graph_matching = graph_matching
        self.weights = dict(weights if weights is not None else {"intra": 1.0, "inter": 1.0, "mask": 1.0})

    @property
    def weights(self) -> dict[str, float]:
        return self._weights

    @weights.setter
    def weights(self, value: Mapping[str, float]) -> None:
        bad = sorted(set(value) - set(TERMS))
        if bad:
            raise ValueError(f"unknown loss terms {bad}; valid: {list(TERMS)}")
        if value.get("graph_matching") and self.graph_matching is None:
            raise ValueError("weights['graph_matching'] > 0 needs Joint3DLoss(graph_matching=LVMMedLoss(...))")
        self._weights = {k: float(v) for k, v in value.items() if v}

    @classmethod
    def for_network(cls, net: nn.Module, **kwargs) -> Joint3DLoss:
        """Sizes from a hybrid network: ``embed_dim`` = its ``F_in``, ``inter_dim`` = f_inter's last width."""
        return cls(net.embed_dim, net.inter.out_dim, **kwargs)

    def _masked_term(self, net: nn.Module, y: Tensor, kpm: Tensor, generator: torch.Generator | None) -> Tensor:
        mask = self.masked.sample_mask(kpm, generator)
        return self.masked.loss(net.inter(self.masked.mask_inputs(y, mask), kpm)[-1], y, mask)

    def forward(self, net: nn.Module, view_s: Tensor, view_t: Tensor, lengths: Tensor | None = None,
                generator: torch.Generator | None = None, coords_s: Tensor | None = None,
                coords_t: Tensor | None = None) -> Joint3DOutput:
        if view_s.shape != view_t.shape:
            raise ValueError(f"the two views must have the same shape (slice i of both from slice i), got "
                             f"{tuple(view_s.shape)} and {tuple(view_t.shape)}")
        w = self.weights
        if not w:
            raise ValueError("every loss weight is zero: nothing to train")
        gm = "graph_matching" in w
        emb_s = net.slice_embeddings(view_s, lengths, return_maps=gm)
        emb_t = net.slice_embeddings(view_t, lengths, return_maps=gm)
        kpm, real = emb_s.key_padding_mask, ~emb_s.key_padding_mask
        terms: dict[str, Tensor] = {}
        if "intra" in w:
            terms["intra"] = self.intra(emb_s.y[real], emb_t.y[real])
        if "inter" in w:
            z_s = net.volume_embedding(net.inter(emb_s.y, kpm)[-1], kpm)
            z_t = net.volume_embedding(net.inter(emb_t.y, kpm)[-1], kpm)
            terms["inter"] = self.inter(z_s, z_t)
        if "mask" in w:  # Eq. 15 sums over the views; each view gets its own random mask
            terms["mask"] = self._masked_term(net, emb_s.y, kpm, generator) + self._masked_term(
                net, emb_t.y, kpm, generator)
        if gm:
            terms["graph_matching"] = self.graph_matching(emb_s.maps, emb_t.maps, coords_s, coords_t).loss
        loss = sum(w[k] * v for k, v in terms.items())
        return Joint3DOutput(loss, {k: v.detach() for k, v in terms.items()})


def set_training_stage(net: nn.Module, loss: Joint3DLoss, stage: int,
                       weights: Mapping[str, float] | None = None) -> list[nn.Parameter]:
    """Set up the paper's stage ``stage`` and return the parameters to optimise.

    Stage 1: f_intra (+ the 2D clustering head) on ``L_2D``; stage 2: f_inter (+ MASK token and decoder) on
    ``L_mask`` with f_intra frozen, its BatchNorm statistics too (``net.set_trainable_parts``); stage 3: f_intra
    and f_inter (+ the 3D head) on ``L_3D``. ``weights`` replaces the stage's terms (e.g. add ``graph_matching``
    or keep ``mask`` in stage 3); a head trains when its term is on and the part it reads trains.
    """
    loss.weights = dict(weights) if weights is not None else stage_weights(stage)
    intra_on, inter_on = stage in (1, 3), stage in (2, 3)
    net.set_trainable_parts(intra_on, inter_on)  # the rest (e.g. a segmentation network's context maps) frozen
    w = loss.weights
    loss.intra.requires_grad_("intra" in w and intra_on)
    loss.inter.requires_grad_("inter" in w)
    loss.masked.requires_grad_("mask" in w and inter_on)
    if loss.graph_matching is not None:
        loss.graph_matching.requires_grad_("graph_matching" in w and intra_on)
    return [p for m in (net, loss) for p in m.parameters() if p.requires_grad]
