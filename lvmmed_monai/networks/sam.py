"""Box-prompted segmentation: the LVM-Med ViT-B as SAM's image encoder, with SAM's prompt encoder and mask decoder.

LVM-Med's strongest published numbers use its ViT-B this way (MedSAM-style fine-tuning with box prompts). The
prompt encoder and mask decoder are ``segment-anything``'s own modules (``pip install "lvmmed-monai[sam]"``),
so a full SAM checkpoint's ``prompt_encoder.*`` / ``mask_decoder.*`` tensors load into them unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lvmmed_monai.encoders.vit import LVMMedViTB
from lvmmed_monai.weights import CheckpointError, CheckpointMismatchError, LoadReport, read_checkpoint

__all__ = ["LVMMedSAM", "require_segment_anything", "SAM_DECODER_PARTS"]

SAM_DECODER_PARTS = ("prompt_encoder", "mask_decoder")
EMBED_DIM = 256  # SAM's prompt / mask-decoder width (the ViT-B neck's output channels)


def require_segment_anything() -> Any:
    """Import ``segment_anything.modeling``, or say how to install it."""
    try:
        from segment_anything import modeling
    except ImportError as err:  # pragma: no cover - the dev set-up installs it
        raise ImportError(
            "SAM-based networks (LVMMedSAM's prompt encoder and mask decoder, the VISTA-2D CellSamWrapper) need "
            'Meta\'s segment-anything package: pip install "lvmmed-monai[sam]"'
        ) from err
    return modeling


def _batched_mask_decoder(modeling: Any, **kwargs: Any) -> nn.Module:
    """SAM's ``MaskDecoder`` that takes one image embedding per prompt.

    SAM's decoder repeats ONE image's embedding for every prompt (``repeat_interleave``), so a batch of
    images fails or mixes images. MedSAM patches its fork the same way: when there are as many embeddings as
    prompts, each prompt uses its own. The parameters (and so the checkpoint keys) are SAM's.
    """

    class BatchedMaskDecoder(modeling.MaskDecoder):
        def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
            if image_embeddings.shape[0] != sparse_prompt_embeddings.shape[0]:
                return super().predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings)
            output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
            output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
            tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
            src = image_embeddings + dense_prompt_embeddings
            pos_src = image_pe.expand(tokens.shape[0], -1, -1, -1)
            b, c, h, w = src.shape
            hs, src = self.transformer(src, pos_src, tokens)
            iou_token_out = hs[:, 0, :]
            mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            hyper_in = torch.stack(
                [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
            )
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
            return masks, self.iou_prediction_head(iou_token_out)

    return BatchedMaskDecoder(**kwargs)


class LVMMedSAM(nn.Module):
    """Box-prompted 2D segmentation: LVM-Med ViT-B image encoder + SAM's prompt encoder and mask decoder.

    ``forward(image, boxes)`` returns one mask logit map per box, at the input's size:

    - ``image``: ``(N, C, img_size, img_size)``, normalised as the encoder expects (SAM's pixel statistics);
    - ``boxes``: ``(N, 4)`` (one box per image) or ``(N, B, 4)`` (B boxes per image), ``[x0, y0, x1, y1]`` in
      pixels of the input, x along the last (width) axis, corners inclusive (MedSAM's convention);
      ``None`` = the whole image;
    - output: ``(N, B, img_size, img_size)`` logits (B = 1 for ``(N, 4)`` boxes).

    :meth:`encode` and :meth:`decode` split the two so that a slice's embedding, the expensive part, is
    computed once for all its boxes (``lvmmed_monai.inference.BoxPromptInferer`` does this).

    Weights: ``encoder_weights`` = LVM-Med's ``lvmmed_vit.pth`` (bare SAM encoder keys) or any checkpoint
    :class:`~lvmmed_monai.encoders.LVMMedViTB` loads; ``sam_checkpoint`` = a full SAM checkpoint
    (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``, e.g. ``sam_vit_b_01ec64.pth`` or a MedSAM
    one) for the prompt encoder and mask decoder, and for the image encoder too when ``encoder_weights`` is
    None. Load reports: ``self.image_encoder.load_report`` and ``self.sam_load_report``.

    ``freeze_encoder`` (default, LVM-Med's and MedSAM-style decoder tuning) keeps the image encoder fixed and
    runs it without gradients; ``freeze_prompt_encoder`` (default, as MedSAM) does the same for the prompt
    encoder. The mask decoder always trains.
    """

    def __init__(
        self,
        img_size: int = 256,
        in_channels: int = 3,
        encoder_weights: str | os.PathLike | Mapping[str, Any] | None = None,
        sam_checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
        freeze_encoder: bool = True,
        freeze_prompt_encoder: bool = True,
        strict: bool = True,
    ) -> None:
        super().__init__()
        modeling = require_segment_anything()
        self.img_size = int(img_size)
        self.image_encoder = LVMMedViTB(img_size=img_size, in_channels=in_channels, weights=encoder_weights,
                                        strict=strict)
        grid = self.img_size // 16
        self.prompt_encoder = modeling.PromptEncoder(
            embed_dim=EMBED_DIM, image_embedding_size=(grid, grid), input_image_size=(self.img_size, self.img_size),
            mask_in_chans=16,
        )
        # SAM ViT-B's decoder (build_sam._build_sam)
        self.mask_decoder = _batched_mask_decoder(
            modeling, num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
        )
        self.sam_load_report: LoadReport | None = None
        if sam_checkpoint is not None:
            self.sam_load_report = self.load_sam_checkpoint(sam_checkpoint, encoder=encoder_weights is None,
                                                             strict=strict)
        self.freeze_encoder = bool(freeze_encoder)
        self.freeze_prompt_encoder = bool(freeze_prompt_encoder)
        self.image_encoder.requires_grad_(not self.freeze_encoder)
        self.prompt_encoder.requires_grad_(not self.freeze_prompt_encoder)

    def load_sam_checkpoint(self, source: str | os.PathLike | Mapping[str, Any], encoder: bool = False,
                            strict: bool = True, check_finite: bool = True) -> LoadReport:
        """Load a full SAM checkpoint's prompt encoder and mask decoder (and its image encoder if ``encoder``).

        The checkpoint must hold ``prompt_encoder.*`` and ``mask_decoder.*`` (a ``module.`` / ``model.``
        prefix on every key is removed); a bare image-encoder file (``lvmmed_vit.pth``) is refused with the advice
        to pass it as ``encoder_weights``. Strict: every decoder key must match, else the mismatched keys are listed.
        """
        state, _ = read_checkpoint(source, check_finite=check_finite)
        for wrapper in ("module.", "model."):  # DDP / Lightning wrappers around the whole SAM
            if all(k.startswith(wrapper) for k in state):
                state = {k[len(wrapper):]: v for k, v in state.items()}
        name = "<state dict>" if isinstance(source, Mapping) else str(source)
        parts = {p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")} for p in SAM_DECODER_PARTS}
        if not any(parts.values()):
            tops = sorted({k.split(".", 1)[0] for k in state})[:8]
            raise CheckpointError(
                f"{name} holds no prompt_encoder.* / mask_decoder.* keys (top-level names: {tops}); it is not a "
                "full SAM checkpoint. An image-encoder-only file such as lvmmed_vit.pth goes in encoder_weights."
            )
        report = LoadReport(expected_layout="sam_full", detected_layout="sam_full")
        for part, sub in parts.items():
            module: nn.Module = getattr(self, part)
            target = module.state_dict()
            report.missing += [f"{part}.{k}" for k in target if k not in sub]
            report.unexpected += [f"{part}.{k}" for k in sub if k not in target]
            report.shape_mismatches += [(f"{part}.{k}", tuple(v.shape), tuple(target[k].shape))
                                        for k, v in sub.items() if k in target and v.shape != target[k].shape]
        if strict and not report.ok:
            raise CheckpointMismatchError(report, source=name)
        for part, sub in parts.items():
            module = getattr(self, part)
            target = module.state_dict()
            loadable = {k: v for k, v in sub.items() if k in target and v.shape == target[k].shape}
            module.load_state_dict(loadable, strict=False)
            report.loaded += [f"{part}.{k}" for k in sorted(loadable)]
        if encoder:
            encoder_state = {k: v for k, v in state.items() if k.startswith("image_encoder.")}
            if encoder_state:
                self.image_encoder.load_weights(encoder_state, strict=strict, check_finite=check_finite)
                report.notes.append(f"image encoder from the same file: {len(encoder_state)} tensors")
        return report

    def train(self, mode: bool = True) -> LVMMedSAM:
        """As ``nn.Module.train``, but a frozen image encoder stays in eval mode (drop-path off)."""
        super().train(mode)
        if self.freeze_encoder:
            self.image_encoder.eval()
        return self

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 4 or tuple(image.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images (N, C, {self.img_size}, {self.img_size}) (the img_size the network was built "
                f"for; resize slices to it, as BoxPromptInferer does), got {tuple(image.shape)}"
            )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, 256, img_size / 16, img_size / 16)`` (SAM's neck output)."""
        self._check_image(image)
        if self.freeze_encoder:
            with torch.no_grad():
                return self.image_encoder(image)
        return self.image_encoder(image)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Mask logits ``(K, 1, img_size, img_size)`` for ``K`` boxes ``(K, 4)`` on ``K`` embeddings (one each)."""
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != embeddings.shape[0]:
            raise ValueError(f"expected boxes (K, 4) for {embeddings.shape[0]} embeddings, got {tuple(boxes.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_prompt_encoder):
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes.to(embeddings.dtype), masks=None)
        low_res, _ = self.mask_decoder(
            image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.encode(image)
        n = image.shape[0]
        if boxes is None:
            boxes = image.new_tensor([0.0, 0.0, self.img_size - 1, self.img_size - 1]).expand(n, 4)
        if boxes.ndim == 2:
            boxes = boxes[:, None]
        if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[-1] != 4:
            raise ValueError(f"expected boxes (N, 4) or (N, B, 4) for N = {n} images, got {tuple(boxes.shape)}")
        per_image = boxes.shape[1]
        logits = self.decode(embeddings.repeat_interleave(per_image, dim=0), boxes.reshape(-1, 4))
        return logits.reshape(n, per_image, self.img_size, self.img_size)
