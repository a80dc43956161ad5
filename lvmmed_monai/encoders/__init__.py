"""LVM-Med encoders and :func:`load_encoder`, the one way to build them by name."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from lvmmed_monai.config_values import as_int
from lvmmed_monai.encoders.resnet import IMAGENET_MEAN, IMAGENET_STD, LVMMedResNet50
from lvmmed_monai.encoders.vit import SAM_PIXEL_MEAN, SAM_PIXEL_STD, LVMMedViTB
from lvmmed_monai.registry import Registry

__all__ = [
    "ENCODERS",
    "load_encoder",
    "LVMMedResNet50",
    "LVMMedViTB",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "input_normalization",
    "build_encoder",
]

# A new encoder: a class with the facts of LVMMedResNet50 / LVMMedViTB (feature_dim, feature_stride, input_mean,
# input_std, pretrain_normalization, level_channels, level_strides, sized_by_image, level_maps, feature_map),
# then ENCODERS.register("name", cls); SEGMENTATION_NETS_2D.register("name", net) for its 2D segmentation network.
ENCODERS = Registry("encoder", {"lvmmed_resnet50": LVMMedResNet50, "lvmmed_vit_b": LVMMedViTB})


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
    return _encoder_class(name)(in_channels=in_channels, weights=weights, **kwargs)


def _encoder_class(name: str) -> type[nn.Module]:
    return ENCODERS.get_or_raise(name)


def input_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` for inputs in ``[0, 1]`` of the encoder ``name`` (its class's ``input_mean`` /
    ``input_std``): ImageNet's for the ResNet-50, SAM's (/255) for the ViT."""
    cls = _encoder_class(name)
    return tuple(cls.input_mean), tuple(cls.input_std)


def build_encoder(
    name: str, image_size: int, weights: str | None = None, zero_init_residual: bool = False,
    frozen_stages: int = -1,
) -> nn.Module:
    """The encoder to pretrain (3 input channels, the official layouts' stem); the ViT gets ``img_size``
    tables for ``image_size`` and its SAM neck, unused by ``feature_map``, is frozen (DDP needs every
    trainable parameter to get a gradient). ``zero_init_residual`` (ResNet-50, random init only): every
    residual block starts as the identity; ``frozen_stages`` (ResNet-50; -1 = none): the stem and the first
    stages get no gradient and keep their BatchNorm statistics (both: see
    :class:`~lvmmed_monai.encoders.LVMMedResNet50`)."""
    image_size = as_int(image_size, "image_size")
    cls = _encoder_class(name)
    kwargs = {"img_size": image_size} if cls.sized_by_image else {}
    if zero_init_residual:
        if "zero_init_residual" not in inspect.signature(cls).parameters:
            raise ValueError(f"zero_init_residual applies to lvmmed_resnet50 only, not {name!r}; set it to false")
        kwargs["zero_init_residual"] = True
    if frozen_stages != -1:
        if "frozen_stages" not in inspect.signature(cls).parameters:
            raise ValueError(f"frozen_stages applies to lvmmed_resnet50 only, not {name!r}; set it to -1")
        kwargs["frozen_stages"] = frozen_stages
    encoder = load_encoder(name, weights=weights, in_channels=3, **kwargs)
    if hasattr(encoder, "neck"):
        encoder.neck.requires_grad_(False)
    return encoder
