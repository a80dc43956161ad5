"""MONAI's ``CellSamWrapper`` (the network of the VISTA-2D cell segmentation bundle) with LVM-Med ViT-B weights."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn

from lvmmed_monai.networks.sam import require_segment_anything
from lvmmed_monai.weights import load_weights, resolve_weights

if TYPE_CHECKING:
    from monai.networks.nets.cell_sam_wrapper import CellSamWrapper

__all__ = ["lvmmed_cell_sam", "sam_vit_b_image_encoder", "SAM_IMAGE_SIZE"]

SAM_IMAGE_SIZE = 1024  # build_sam_vit_b's image size: pos_embed 64 x 64, global rel-pos tables 127 rows
_SAM_LAYOUT = "sam_vit_b"  # the image encoder's own keys: what weights.load_weights converts checkpoints to


def _square_size(roi: int | Sequence[int]) -> int:
    size = (int(roi), int(roi)) if isinstance(roi, int) else tuple(int(s) for s in roi)
    if len(size) != 2 or size[0] != size[1] or size[0] < 16 or size[0] % 16:
        raise ValueError(f"network_resize_roi must be square and a positive multiple of the patch size 16 "
                         f"(e.g. (1024, 1024) as SAM, (256, 256) on a CPU), got {roi!r}")
    return size[0]


def sam_vit_b_image_encoder(img_size: int = SAM_IMAGE_SIZE) -> nn.Module:
    """SAM's ``ImageEncoderViT`` with ``build_sam_vit_b``'s hyper-parameters, its position tables for ``img_size``.

    Declares ``weights_layout`` (``sam_vit_b``) and ``first_conv_key`` as the LVM-Med encoders do, so
    :func:`~lvmmed_monai.weights.load_weights` can load, convert and resize any ViT-B checkpoint into it.
    """
    encoder = require_segment_anything().ImageEncoderViT(
        img_size=_square_size(img_size), patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
        mlp_ratio=4, out_chans=256, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=(2, 5, 8, 11), window_size=14,
    )
    return _declare_layout(encoder)


def _declare_layout(encoder: nn.Module) -> nn.Module:
    encoder.weights_layout = _SAM_LAYOUT
    encoder.first_conv_key = "patch_embed.proj.weight"
    return encoder


def lvmmed_cell_sam(
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    network_resize_roi: int | Sequence[int] = (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE),
    auto_resize_inputs: bool = True,
    return_features: bool = False,
    strict: bool = True,
    check_finite: bool = True,
) -> CellSamWrapper:
    """MONAI's ``CellSamWrapper`` whose SAM ViT-B image encoder holds LVM-Med's ViT-B weights.

    What: ``CellSamWrapper`` (``monai.networks.nets.cell_sam_wrapper``) is SAM's ViT-B image encoder, without
    the prompt encoder, followed by a small convolutional decoder to 3 channels (VISTA-2D reads them as a
    cell-probability logit and two cellpose flows). It is the network of VISTA-2D, MONAI's cell segmentation
    bundle. LVM-Med's ViT-B has exactly SAM ViT-B's image-encoder architecture, so its weights drop in here
    (``network_def: {_target_: lvmmed_monai.networks.lvmmed_cell_sam, weights: ...}`` in the bundle).

    Why not MONAI's own constructor: ``CellSamWrapper(checkpoint=...)`` hands the file to
    ``build_sam_vit_b``, which ``torch.load``s it and loads it strictly into a whole SAM (``image_encoder.*``,
    ``prompt_encoder.*``, ``mask_decoder.*``) at 1024 px. LVM-Med's ``lvmmed_vit.pth`` is the bare encoder
    (no prefix, no decoders), a converted or fine-tuned copy may be in timm's ``samvit`` layout, and a CPU
    cannot afford 1024 px. So the wrapper is built with ``checkpoint=None`` (random initialisation, nothing
    downloaded), and for ``network_resize_roi`` other than 1024 its image encoder is replaced by the same
    ViT-B built for that size (:func:`sam_vit_b_image_encoder`; with ``auto_resize_inputs`` the wrapper resizes
    every input to it). ``weights`` then goes through :func:`~lvmmed_monai.weights.load_weights`: read
    safely (NaN/Inf refused unless ``check_finite=False``), wrappers and prefixes such as ``image_encoder.``
    stripped (a full SAM checkpoint gives its encoder), timm keys converted to SAM's, ``pos_embed`` and the
    relative-position tables resized from any stored image size. With ``strict`` any missing, unexpected or
    misshaped key raises :class:`~lvmmed_monai.weights.CheckpointMismatchError` listing them, before the
    network is touched. The report is kept as ``wrapper.load_report`` (``None`` without weights).

    ``weights``: a local path, an explicit URL or ``hf://repo/file`` (:func:`~lvmmed_monai.weights.resolve_weights`)
    or a state dict. Inputs: ``(N, 3, H, W)``; VISTA-2D feeds images scaled to [0, 1] (its transforms), not
    SAM's pixel normalisation. Without ``auto_resize_inputs`` inputs must be ``network_resize_roi`` already.
    Needs segment-anything (``pip install "lvmmed-monai[sam]"``).
    """
    size = _square_size(network_resize_roi)
    require_segment_anything()  # CellSamWrapper's own error names a git install; ours the package extra
    from monai.networks.nets.cell_sam_wrapper import CellSamWrapper

    source = weights if weights is None or isinstance(weights, Mapping) else resolve_weights(weights)  # fail fast

    wrapper = CellSamWrapper(auto_resize_inputs=auto_resize_inputs, network_resize_roi=(size, size),
                             checkpoint=None, return_features=return_features)
    if size != SAM_IMAGE_SIZE:
        wrapper.model.image_encoder = sam_vit_b_image_encoder(size)
    encoder = _declare_layout(wrapper.model.image_encoder)
    wrapper.load_report = None
    if source is not None:
        wrapper.load_report = load_weights(encoder, source, strict=strict, check_finite=check_finite)
    return wrapper

