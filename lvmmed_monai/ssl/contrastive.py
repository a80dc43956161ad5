"""SimCLR's NT-Xent (InfoNCE) objective on the encoder maps, the contrastive baseline LVM-Med is compared with.

The loss itself is MONAI's :class:`monai.losses.ContrastiveLoss`; this module adds what SimCLR puts around it
(global average pooling and a Linear-BatchNorm-ReLU-Linear projection head, :class:`~lvmmed_monai.ssl.graph.
Projector`) and takes the same inputs as :class:`~lvmmed_monai.ssl.LVMMedLoss`, so one training loop can run
either objective at the same budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from torch import Tensor, nn

from lvmmed_monai.ssl.graph import Projector
from lvmmed_monai.ssl.loss import LVMMedLossOutput

__all__ = ["SimCLRLoss"]


class SimCLRLoss(nn.Module):
    """NT-Xent over the ``2N`` pooled, projected views of a batch (each view's positive is its other view).

    Args:
        in_dim: encoder channels (2048 for ResNet-50). proj_dim: embedding width (SimCLR: 128).
        hidden_dim: width of the projection head's hidden layer (SimCLR: the encoder width).
        temperature: softmax temperature of NT-Xent (SimCLR uses 0.1-0.5; MONAI's default 0.5).
    """

    def __init__(self, in_dim: int = 2048, proj_dim: int = 128, hidden_dim: int | None = 2048,
                 temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.in_dim = in_dim
        self.projector = Projector(in_dim, proj_dim, hidden_dim)
        self.loss = ContrastiveLoss(temperature=temperature)

    def forward(self, feats_s: Tensor, feats_t: Tensor, *_: object, **__: object) -> LVMMedLossOutput:
        """``(N, D, R, S)`` maps of the two views -> ``(loss, stats)``; ``stats["retrieval_accuracy"]`` is the
        share of views whose most similar other-view embedding is their own (chance ``1 / N``)."""
        for name, f in (("feats_s", feats_s), ("feats_t", feats_t)):
            if f.dim() != 4 or f.shape[1] != self.in_dim:
                raise ValueError(f"{name} must be encoder maps (N, D={self.in_dim}, R, S), got {tuple(f.shape)}")
        if feats_s.shape[0] != feats_t.shape[0] or feats_s.shape[0] < 2:
            raise ValueError(f"need two views of the same N >= 2 images, got {feats_s.shape[0]} and {feats_t.shape[0]}")
        n = feats_s.shape[0]
        z = self.projector(torch.cat([feats_s.float().mean((2, 3)), feats_t.float().mean((2, 3))]))
        zs, zt = z[:n], z[n:]
        loss = self.loss(zs, zt)
        with torch.no_grad():
            best = (F.normalize(zs, dim=1) @ F.normalize(zt, dim=1).T).argmax(1)
            retrieval = (best == torch.arange(n, device=best.device)).float().mean()
        return LVMMedLossOutput(loss, {"retrieval_accuracy": retrieval})
