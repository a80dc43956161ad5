"""Generated stand-ins for real data and weights: checkpoints in the official layouts, phantom images.

Nothing is downloaded: tests and the demo use these. The checkpoints have random weights but exactly the
key layout (names, shapes) of the released LVM-Med files, so every loading path is exercised for real.
"""

from __future__ import annotations

import math

import torch
import torchvision

from lvmmed_monai.weights import timm_to_sam

__all__ = ["official_resnet50_state", "official_vit_b_state", "phantom_batch"]


def official_resnet50_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-50 state dict with ``fc.*``: the layout of ``lvmmed_resnet.torch``."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    # give BatchNorm non-trivial statistics so that a wrong mapping changes the features
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.state_dict()


def official_vit_b_state(seed: int = 0, img_size: int = 1024) -> dict[str, torch.Tensor]:
    """A SAM ``ImageEncoderViT`` ViT-B state dict (``mlp.lin*`` keys, ``pos_embed`` 1x64x64x768 at 1024)."""
    from lvmmed_monai.encoders.vit import LVMMedViTB

    torch.manual_seed(seed)
    model = LVMMedViTB(img_size=img_size)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                p.normal_(0, 0.02)
    return timm_to_sam(model.state_dict())


def phantom_batch(
    n: int, size: int = 64, channels: int = 1, num_classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, channels, size, size)`` in [0, 1] with ellipses, and their labels ``(n, 1, size, size)``.

    Class 1 is a large ellipse ("organ"), class 2 a small bright disc inside it ("lesion"), on a smooth
    noisy background: a tiny segmentation task with known truth.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) - 0.5) * 0.6
        ay, ax = 0.35 + 0.3 * torch.rand(2, generator=g)
        angle = math.pi * torch.rand((), generator=g)
        c, s = torch.cos(angle), torch.sin(angle)
        u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
        organ = (u / ax) ** 2 + (v / ay) ** 2 <= 1
        r = 0.08 + 0.08 * torch.rand((), generator=g)
        lesion = ((xx - cx - 0.3 * ax * c) ** 2 + (yy - cy - 0.3 * ax * s) ** 2 <= r**2) & organ
        img = 0.2 + 0.1 * yy + 0.4 * organ.float() + 0.3 * lesion.float()
        img = img + 0.05 * torch.randn(size, size, generator=g)
        label = organ.long() + lesion.long() if num_classes > 2 else organ.long()
        images.append(img.clamp(0, 1).expand(channels, size, size))
        labels.append(label[None])
    return torch.stack(images), torch.stack(labels)
