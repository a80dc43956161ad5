"""LVM-Med ResNet-50: MONAI's ``ResNetFeatures`` (torchvision key layout) as a FlexibleUNet backbone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.blocks import BaseEncoder
from monai.networks.nets import ResNetFeatures

from lvmmed_monai.weights import LoadReport, LoadsWeights

__all__ = ["LVMMedResNet50", "IMAGENET_MEAN", "IMAGENET_STD"]

# LVM-Med's ResNet-50 examples feed RGB in [0, 1] normalised with ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LVMMedResNet50(ResNetFeatures, BaseEncoder, LoadsWeights):
    """ResNet-50 encoder in the layout of the released ``lvmmed_resnet.torch``.

    MONAI's ``ResNetFeatures("resnet50", spatial_dims=2)`` has exactly torchvision's key names (318 tensors
    without ``fc``) and its features, so the official file loads strictly. ``forward`` returns the five
    feature maps FlexibleUNet expects, strides 2, 4, 8, 16, 32 with 64, 256, 512, 1024, 2048 channels;
    :meth:`feature_map` returns the last one (what the SSL projector and classifiers pool).

    Args:
        in_channels: input channels; 1 sums the RGB kernels of conv1 (exactly the response to the grey
            image replicated to RGB), other counts follow timm's ``adapt_input_conv`` (see
            :func:`lvmmed_monai.weights.adapt_in_channels`).
        weights: a checkpoint path, an explicit URL / ``hf://`` address, or a state dict; None = random init.
        spatial_dims: must be 2 (LVM-Med is a 2D model; use the hybrid backbone for volumes).
        pretrained: FlexibleUNet's flag; True without ``weights`` is an error, weights are never implicit.
        strict: raise :class:`~lvmmed_monai.weights.CheckpointMismatchError` on any key/shape mismatch.
        zero_init_residual: random init only: zero the last BatchNorm scale of every bottleneck, so each
            residual block starts as the identity (torchvision's ``resnet50(zero_init_residual=True)``, Goyal et
            al. 2017; MoCo v3 pretrains so). MONAI's ``ResNetFeatures`` has no such option. Ignored when
            ``weights`` are loaded.
        check_finite: refuse a checkpoint whose tensors hold NaN or Inf (False loads it anyway).
        frozen_stages: -1 (default) trains everything; ``s >= 0`` freezes the stem (0) and ``layer1`` ..
            ``layer{s}``: their parameters get no gradient and their BatchNorm stays in eval mode through
            ``train()``, so their running statistics stay as loaded or initialised (mmdet / mmpretrain
            ResNet's ``frozen_stages``; MONAI's ``ResNetFeatures`` has no such option). Why: pretraining from
            random init at a small budget, GM-SSL's gradient made the early stages' maps worse for
            segmentation than their random init (docs/ssl.md, "Freezing the early stages").
    """

    weights_layout = "torchvision_resnet50"
    first_conv_key = "conv1.weight"
    # the encoder's facts, read by every other module (one home per encoder, as timm's per-model config)
    feature_dim = 2048
    feature_stride = 32
    input_mean, input_std = IMAGENET_MEAN, IMAGENET_STD  # for inputs in [0, 1] (torchvision's ImageNet statistics)
    # as the exported adaptation_plan.json records it: the scale the statistics are given on
    pretrain_normalization = {"scheme": "imagenet", "input_range": [0.0, 1.0], "mean": list(IMAGENET_MEAN),
                              "std": list(IMAGENET_STD)}
    level_channels = (64, 256, 512, 1024, 2048)  # level_maps(): stem, layer1 .. layer4
    level_strides = (2, 4, 8, 16, 32)
    last_block_level = 4  # layer4
    sized_by_image = False  # any input size; no img_size argument

    def __init__(
        self,
        in_channels: int = 3,
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        pretrained: bool = False,
        strict: bool = True,
        zero_init_residual: bool = False,
        check_finite: bool = True,
        frozen_stages: int = -1,
    ) -> None:
        if spatial_dims != 2:
            raise ValueError(
                f"LVM-Med ResNet-50 is a 2D encoder, got spatial_dims={spatial_dims}; run volumes slice by slice "
                "(monai.inferers.SliceInferer) or use lvmmed_monai.networks.hybrid for 3D context."
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be an int in [-1, 4] (-1: none, 0: the stem, s: the stem and "
                             f"layer1 .. layer<s>), got {frozen_stages!r}")
        super().__init__("resnet50", pretrained=False, spatial_dims=2, in_channels=in_channels)
        self.load_report: LoadReport | None = None
        if zero_init_residual:
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                for block in layer:
                    torch.nn.init.zeros_(block.bn3.weight)
        if weights is not None:
            self.load_weights(weights, strict=strict, check_finite=check_finite)
        elif pretrained:
            raise ValueError(
                "pretrained=True needs a weights file: LVM-Med weights are never downloaded implicitly. Build "
                "lvmmed_monai.networks.LVMMedFlexibleUNet(..., weights=PATH) or call encoder.load_weights(PATH)."
            )
        self.frozen_stages = frozen_stages
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The modules that ``frozen_stages`` freezes, stem first (looked up at call time, so modules replaced
        later, e.g. by ``SyncBatchNorm.convert_sync_batchnorm``, stay frozen)."""
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def train(self, mode: bool = True) -> LVMMedResNet50:
        """``nn.Module.train``, with the frozen stages kept in eval mode."""
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The maps of :attr:`level_channels` (stem, layer1 .. layer4), as MONAI's ``ResNetFeatures`` returns them."""
        return list(self(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> last stage ``(N, 2048, H/32, W/32)``, without computing the list of skips."""
        x = self.act(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"in_channels": 3, "spatial_dims": 2, "pretrained": False, "weights": None}]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [(64, 256, 512, 1024, 2048)]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [5]

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return ["lvmmed_resnet50"]
