"""Generated stand-ins for real data and weights: checkpoints in the official layouts, phantom images and the
``lvmmed_seg`` bundle's built-in 2D collection.

Nothing is downloaded: tests and the demo use these. The checkpoints have random weights but exactly the
key layout (names, shapes) of the released LVM-Med files, so every loading path is exercised for real.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torchvision

from lvmmed_monai.io import write_folder_once
from lvmmed_monai.weights import timm_to_sam

__all__ = ["official_resnet50_state", "official_vit_b_state", "phantom_batch", "write_nnunet_raw_dataset",
           "IMAGE_PHANTOM_CLASSES", "write_phantom_images"]


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


def write_nnunet_raw_dataset(
    root: str | os.PathLike, dataset_id: int = 501, num_cases: int = 6, size: int = 64, seed: int = 0
) -> Path:
    """Write a tiny 2D phantom dataset in nnU-Net v2's raw format (NIfTI, 1 slice) and return its folder.

    ``Dataset{id:03d}_LVMMedPhantom/imagesTr/case_XXX_0000.nii.gz``, ``labelsTr/case_XXX.nii.gz`` and
    ``dataset.json`` with labels background / organ / lesion: enough for plan, train and predict.
    """
    import json

    import nibabel as nib
    import numpy as np

    folder = Path(root) / f"Dataset{dataset_id:03d}_LVMMedPhantom"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    images, labels = phantom_batch(num_cases, size=size, channels=1, num_classes=3, seed=seed)
    affine = np.eye(4)
    for i in range(num_cases):
        img = images[i, 0].numpy().astype(np.float32)[:, :, None] * 1000.0
        lab = labels[i, 0].numpy().astype(np.uint8)[:, :, None]
        nib.save(nib.Nifti1Image(img, affine), folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    meta = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "name": "LVMMedPhantom",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


IMAGE_PHANTOM_CLASSES = ("background", "organ", "lesion")
_IMAGE_PHANTOM_VERSION = 1


def write_phantom_images(root: str | os.PathLike, num_images: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``num_images`` labeled 2D phantoms (:func:`~lvmmed_monai.demo.synthetic.phantom_batch`: an organ
    ellipse and a lesion disc, classes :data:`IMAGE_PHANTOM_CLASSES`) as ``root/images/phantom_NN.png`` (grey,
    0-255) and ``root/labels/phantom_NN.png`` (class indices), once; built in a temporary sibling and renamed."""
    if int(num_images) < 1 or int(size) < 8:
        raise ValueError(f"need num_images >= 1 and size >= 8, got {num_images}, {size}")
    from PIL import Image

    def fill(tmp: Path) -> None:
        images, labels = phantom_batch(int(num_images), size=int(size), num_classes=3, seed=seed)
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for i in range(int(num_images)):
            Image.fromarray((images[i, 0].numpy() * 255).round().astype(np.uint8)).save(tmp / "images" /
                                                                                        f"phantom_{i:02d}.png")
            Image.fromarray(labels[i, 0].numpy().astype(np.uint8)).save(tmp / "labels" / f"phantom_{i:02d}.png")

    stamp = {"version": _IMAGE_PHANTOM_VERSION, "num_images": int(num_images), "size": int(size), "seed": seed}
    return write_folder_once(root, stamp, fill)
