"""Image classification on an LVM-Med encoder: linear probe (frozen encoder) or full fine-tuning."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lvmmed_monai.encoders import load_encoder

__all__ = ["LVMMedClassifier"]


class LVMMedClassifier(nn.Module):
    """Encoder -> global average pool of :meth:`feature_map` -> FC head.

    ``freeze_encoder=True`` is the linear probe of the paper: encoder parameters get no gradient and the
    encoder stays in eval mode (BatchNorm statistics frozen) even under ``model.train()``.
    ``hidden_dims`` adds FC + ReLU + dropout layers before the output (LVM-Med's "multiple FCNs" setting).
    The ViT pools its last block (768-d, what LVM-Med's projector sees); SAM's neck is then unused and
    frozen so that optimisers and DDP see no parameter without a gradient.
    """

    def __init__(
        self,
        num_classes: int,
        encoder: str = "lvmmed_resnet50",
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        in_channels: int = 3,
        freeze_encoder: bool = False,
        hidden_dims: Sequence[int] = (),
        dropout: float = 0.0,
        strict: bool = True,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.encoder = load_encoder(encoder, weights=weights, in_channels=in_channels, strict=strict,
                                    **encoder_kwargs)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        if hasattr(self.encoder, "neck"):  # SAM's neck is not on the path of feature_map (768-d tokens)
            self.encoder.neck.requires_grad_(False)
        layers: list[nn.Module] = []
        width = self.encoder.feature_dim
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*layers)

    def train(self, mode: bool = True) -> LVMMedClassifier:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features ``(N, feature_dim)``."""
        return self.encoder.feature_map(x).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
