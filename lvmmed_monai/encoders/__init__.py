"""LVM-Med encoders and :func:`load_encoder`, the one way to build them by name."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from lvmmed_monai.encoders.resnet import IMAGENET_MEAN, IMAGENET_STD, LVMMedResNet50
from lvmmed_monai.encoders.vit import SAM_PIXEL_MEAN, SAM_PIXEL_STD, LVMMedViTB

__all__ = [
    "ENCODERS",
    "load_encoder",
    "LVMMedResNet50",
    "LVMMedViTB",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
]

ENCODERS: dict[str, type[nn.Module]] = {"lvmmed_resnet50": LVMMedResNet50, "lvmmed_vit_b": LVMMedViTB}


def load_encoder(
    name: str,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    in_channels: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """Build the encoder ``name`` (``lvmmed_resnet50`` or ``lvmmed_vit_b``) and load ``weights`` if given.

    ``weights`` is a local file, an explicit URL or ``hf://<repo>/<file>``, or a state dict, in any
    layout :mod:`lvmmed_monai.weights` knows. Loading is strict by default (``strict=False`` loads what
    fits); the report is in ``encoder.load_report``. A checkpoint whose tensors hold NaN or Inf is refused
    (``check_finite=False`` loads it anyway). Extra ``kwargs`` go to the encoder class (e.g. ``img_size``
    for the ViT).
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid names: {sorted(ENCODERS)}")
    return ENCODERS[name](in_channels=in_channels, weights=weights, **kwargs)
