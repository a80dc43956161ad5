"""Faster R-CNN with the LVM-Med ResNet-50 + FPN backbone, from torchvision's detection parts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from lvmmed_monai.encoders import IMAGENET_MEAN, IMAGENET_STD, load_encoder

__all__ = ["lvmmed_faster_rcnn"]


def lvmmed_faster_rcnn(
    num_classes: int,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    in_channels: int = 3,
    trainable_layers: int = 3,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    strict: bool = True,
    **rcnn_kwargs: Any,
) -> FasterRCNN:
    """torchvision ``FasterRCNN`` whose ResNet-50 FPN backbone starts from LVM-Med weights.

    As in torchvision's ``fasterrcnn_resnet50_fpn`` (and LVM-Med's detection example): frozen BatchNorm,
    the first ``5 - trainable_layers`` stages frozen, FPN on layers 1-4. The weights are checked by our
    encoder loader (layout, keys, channel adaptation) and then copied into torchvision's ResNet-50.
    ``num_classes`` counts the background. Images are RGB in [0, 1]; for ``in_channels=1`` the ImageNet
    statistics are averaged.
    """
    encoder = load_encoder("lvmmed_resnet50", weights=weights, in_channels=in_channels, strict=strict)
    trunk = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    if in_channels != 3:
        trunk.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    result = trunk.load_state_dict(encoder.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # the two layouts are the same by construction; guard against drift
        raise RuntimeError(f"ResNet-50 layouts diverged: missing {missing[:5]}, unexpected {unexpected[:5]}")
    backbone = _resnet_fpn_extractor(trunk, trainable_layers)
    if image_mean is None or image_std is None:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        if in_channels != 3:
            mean, std = [sum(mean) / 3] * in_channels, [sum(std) / 3] * in_channels
        image_mean, image_std = image_mean or mean, image_std or std
    return FasterRCNN(backbone, num_classes=num_classes, image_mean=list(image_mean), image_std=list(image_std),
                      **rcnn_kwargs)
