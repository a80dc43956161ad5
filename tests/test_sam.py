"""Box-prompted segmentation (issue 17): LVMMedSAM against segment-anything's own ``Sam`` with the same weights,
the two checkpoint layouts it loads, the box tables against brute force, MedSAM's training prompts, and the
slice-by-slice inferer against a plain loop over the boxes."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from lvmmed_monai.data.boxes import (
    BoxesFromLabeld,
    BoxTabled,
    RandBoxPromptd,
    check_box_table,
    label_boxes,
    read_boxes_file,
)
from lvmmed_monai.data.loading import VolumeDataError
from lvmmed_monai.encoders.vit import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from lvmmed_monai.inference import BoxPromptInferer
from lvmmed_monai.networks import LVMMedSAM
from lvmmed_monai.weights import CheckpointError, CheckpointMismatchError, timm_to_sam

modeling = pytest.importorskip("segment_anything.modeling")
SIZE = 32


@pytest.fixture(scope="module")
def net() -> LVMMedSAM:
    torch.manual_seed(0)
    return LVMMedSAM(img_size=SIZE, in_channels=3).eval()


def _sam_reference(net: LVMMedSAM):
    """segment-anything's own ``Sam`` at ``net``'s size, holding ``net``'s tensors."""
    from functools import partial

    encoder = modeling.ImageEncoderViT(
        img_size=SIZE, depth=12, embed_dim=768, num_heads=12, mlp_ratio=4, patch_size=16, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11],
        window_size=14, out_chans=256,
    )
    encoder.load_state_dict(timm_to_sam(net.image_encoder.state_dict()))
    decoder = modeling.MaskDecoder(num_multimask_outputs=3, transformer=modeling.TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
        iou_head_hidden_dim=256)
    decoder.load_state_dict(net.mask_decoder.state_dict())
    sam = modeling.Sam(image_encoder=encoder, prompt_encoder=net.prompt_encoder, mask_decoder=decoder,
                       pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))
    return sam.eval()


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    return (raw - torch.tensor(SAM_PIXEL_MEAN)[:, None, None]) / torch.tensor(SAM_PIXEL_STD)[:, None, None]


def test_logits_equal_segment_anythings_sam_for_a_batch_of_images_with_several_boxes(net, one_thread):
    """Sam.forward runs image by image, repeating each image's embedding for its boxes; LVMMedSAM batches the
    images and their boxes (the decoder's one change): same logits, at the input's size."""
    sam = _sam_reference(net)
    raw = torch.rand(2, 3, SIZE, SIZE) * 255
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 31.0, 31.0], [10.0, 4.0, 12.0, 30.0]],
                          [[5.0, 5.0, 9.0, 9.0], [1.0, 20.0, 30.0, 30.0], [0.0, 0.0, 15.0, 15.0]]])
    with torch.no_grad():
        ours = net(torch.stack([_normalise(r) for r in raw]), boxes)
        records = [{"image": r, "original_size": (SIZE, SIZE), "boxes": b} for r, b in zip(raw, boxes, strict=True)]
        reference = sam(records, multimask_output=False)
    assert ours.shape == (2, 3, SIZE, SIZE)
    for i, out in enumerate(reference):
        expected = sam.postprocess_masks(out["low_res_logits"], (SIZE, SIZE), (SIZE, SIZE))[:, 0]
        torch.testing.assert_close(ours[i], expected, atol=2e-4, rtol=1e-4)
    # (N, 4) boxes: one mask each; no boxes: the whole image's box
    with torch.no_grad():
        one = net(torch.stack([_normalise(r) for r in raw]), boxes[:, 1])
        whole = net(torch.stack([_normalise(r) for r in raw]))
    torch.testing.assert_close(one[:, 0], ours[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole[0], ours[0, 1:2], atol=1e-5, rtol=1e-5)  # image 0's box 1 is the whole image


@pytest.mark.parametrize("freeze_encoder", [True, False])
def test_backward_trains_the_decoder_and_the_encoder_only_when_not_frozen(freeze_encoder, one_thread):
    torch.manual_seed(0)
    net = LVMMedSAM(img_size=SIZE, in_channels=1, freeze_encoder=freeze_encoder).train()
    assert not net.image_encoder.training or not freeze_encoder  # a frozen encoder stays in eval mode
    out = net(torch.randn(2, 1, SIZE, SIZE), torch.tensor([[1.0, 2.0, 20.0, 30.0], [4.0, 4.0, 8.0, 8.0]]))
    out.sum().backward()
    grads = {n.split(".")[0]: [] for n, _ in net.named_parameters()}
    for name, p in net.named_parameters():
        grads[name.split(".")[0]].append(p.grad is not None and bool(p.grad.abs().sum() > 0))
    assert any(grads["mask_decoder"])
    assert not any(grads["prompt_encoder"])  # frozen by default, as MedSAM
    assert any(grads["image_encoder"]) is not freeze_encoder
    with pytest.raises(ValueError, match=f"expected images \\(N, C, {SIZE}, {SIZE}\\)"):
        net(torch.randn(1, 1, 48, 48))
    with pytest.raises(ValueError, match="expected boxes"):
        net(torch.randn(2, 1, SIZE, SIZE), torch.zeros(3, 4))


def _full_sam_state(net: LVMMedSAM, prefix: str = "") -> dict[str, torch.Tensor]:
    state = {f"image_encoder.{k}": v.clone() for k, v in timm_to_sam(net.image_encoder.state_dict()).items()}
    for part in ("prompt_encoder", "mask_decoder"):
        state.update({f"{part}.{k}": v.clone() for k, v in getattr(net, part).state_dict().items()})
    return {prefix + k: v for k, v in state.items()}


def test_loads_the_released_encoder_and_a_full_sam_checkpoint_strictly(vit_file, sam_vit_state, tmp_path, one_thread):
    """lvmmed_vit.pth (bare SAM encoder keys) goes into the image encoder (resized to img_size); a full SAM
    checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.*) into the decoder, and into the encoder too
    when no encoder weights are given."""
    torch.manual_seed(1)
    source = LVMMedSAM(img_size=SIZE, in_channels=3)
    torch.save({"model": _full_sam_state(source, "module.")}, tmp_path / "sam_full.pth")
    torch.manual_seed(2)
    net = LVMMedSAM(img_size=SIZE, in_channels=3, encoder_weights=vit_file, sam_checkpoint=tmp_path / "sam_full.pth")
    assert net.image_encoder.load_report.ok and net.sam_load_report.ok
    assert len(net.sam_load_report.loaded) == len(net.prompt_encoder.state_dict()) + len(net.mask_decoder.state_dict())
    for part in ("prompt_encoder", "mask_decoder"):
        for k, v in getattr(source, part).state_dict().items():
            assert torch.equal(getattr(net, part).state_dict()[k], v), k
    # the encoder is the released file's (its blocks' qkv unchanged by resizing), not the SAM file's
    assert torch.equal(net.image_encoder.blocks[3].attn.qkv.weight, sam_vit_state["blocks.3.attn.qkv.weight"])
    torch.manual_seed(3)
    from_sam = LVMMedSAM(img_size=SIZE, in_channels=3, sam_checkpoint=tmp_path / "sam_full.pth")
    for k, v in source.image_encoder.state_dict().items():
        assert torch.equal(from_sam.image_encoder.state_dict()[k], v), k


def test_wrong_sam_checkpoints_are_refused_with_the_keys(sam_vit_state, one_thread):
    net = LVMMedSAM(img_size=SIZE, in_channels=3)
    with pytest.raises(CheckpointError, match="no prompt_encoder.* / mask_decoder.* keys.*encoder_weights"):
        net.load_sam_checkpoint(sam_vit_state)  # the released encoder is not a full SAM checkpoint
    state = _full_sam_state(net)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 128)
    with pytest.raises(CheckpointMismatchError) as err:
        net.load_sam_checkpoint(state)
    for text in ("missing (1): mask_decoder.iou_token.weight", "unexpected (1): mask_decoder.extra.weight",
                 "prompt_encoder.no_mask_embed.weight: checkpoint (1, 128) vs model (1, 256)"):
        assert text in str(err.value)
    bad = _full_sam_state(net)
    bad["mask_decoder.iou_token.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or Inf.*mask_decoder.iou_token.weight"):
        net.load_sam_checkpoint(bad)


# ---------------------------------------------------------------- boxes


def _brute_boxes(label: np.ndarray, mode: str) -> list[tuple]:
    """Boxes of an (H, W, D) label map by visiting every pixel (and a breadth-first search for components)."""
    h, w, d = label.shape
    out = []
    for s in range(d):
        for c in sorted(set(label[..., s].ravel()) - {0}):
            pixels = [(y, x) for y in range(h) for x in range(w) if label[y, x, s] == c]
            groups = [pixels]
            if mode == "component":
                left, groups = set(pixels), []
                while left:
                    queue, group = deque([left.pop()]), []
                    while queue:
                        y, x = queue.popleft()
                        group.append((y, x))
                        for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                            if n in left:
                                left.remove(n)
                                queue.append(n)
                    groups.append(group)
            for g in groups:
                ys, xs = zip(*g, strict=True)
                out.append((s, c, min(xs), min(ys), max(xs), max(ys)))
    return sorted(out)


@pytest.mark.parametrize("mode", ["class", "component"])
@pytest.mark.parametrize("slice_axis", [0, 2])
def test_label_boxes_match_brute_force(mode, slice_axis):
    rng = np.random.default_rng(0)
    for _ in range(5):
        label = (rng.random((9, 11, 4)) < 0.15) * rng.integers(1, 4, (9, 11, 4))
        volume = np.moveaxis(label, -1, slice_axis)
        table = label_boxes(volume[None], mode, slice_axis)
        assert sorted(map(tuple, table.astype(int).tolist())) == _brute_boxes(label, mode)
        assert table.dtype == np.float32 and table.shape[1] == 6
        two_d = label_boxes(label[..., 1], mode)
        assert sorted(map(tuple, two_d.astype(int).tolist())) == [
            (0, *b[1:]) for b in _brute_boxes(label[..., 1:2], mode)]
    assert label_boxes(np.zeros((5, 5)), mode).shape == (0, 6)
    with pytest.raises(ValueError, match="box mode"):
        label_boxes(np.zeros((5, 5)), "pixel")


def test_boxes_from_label_transform_on_channel_first_2d_and_3d():
    label = np.zeros((1, 8, 9, 3), np.uint8)
    label[0, 1:3, 2:5, 1] = 2
    label[0, 5, 7, 2] = 1
    out = BoxesFromLabeld("label", slice_axis=2)({"label": torch.as_tensor(label)})["boxes"]
    assert out.tolist() == [[1, 2, 2, 1, 4, 2], [2, 1, 7, 5, 7, 5]]
    out2d = BoxesFromLabeld("label")({"label": label[..., 1]})["boxes"]
    assert out2d.tolist() == [[0, 2, 2, 1, 4, 2]]


@pytest.mark.parametrize("mode", ["class", "component"])
def test_training_prompts_box_one_object_and_make_its_mask_the_target(mode):
    label = np.zeros((1, 20, 24), np.int64)
    label[0, 2:6, 3:9] = 1
    label[0, 12:15, 15:22] = 1  # a second component of class 1
    label[0, 8:10, 10:12] = 2
    transform = RandBoxPromptd("label", mode=mode, jitter=3)
    transform.set_random_state(0)
    seen = set()
    for _ in range(40):
        out = transform({"label": label})
        mask, box = out["label"].numpy()[0].astype(bool), out["box"].numpy()
        assert out["label"].shape == (1, 20, 24) and out["label"].dtype == torch.float32
        ys, xs = np.nonzero(mask)
        tight = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
        assert (box[:2] <= tight[:2]).all() and (box[2:] >= tight[2:]).all()  # moved outwards only
        assert (np.abs(box - tight) <= 3).all() and box.min() >= 0 and box[2] <= 23 and box[3] <= 19
        classes = set(label[0][mask].tolist())
        assert len(classes) == 1  # one class's pixels
        if mode == "class":
            assert (mask == (label[0] == classes.pop())).all()
        seen.add(tuple(tight))
    assert len(seen) == (3 if mode == "component" else 2)  # every object gets drawn
    empty = transform({"label": np.zeros((1, 6, 7))})
    assert empty["label"].sum() == 0 and (empty["box"][:2] <= empty["box"][2:]).all()


def test_user_boxes_are_checked_against_the_image(tmp_path):
    image = MetaTensor(torch.zeros(1, 10, 12, 5), meta={"filename_or_obj": "case.nii.gz"})
    entries = [{"box": [1, 2, 8, 9], "label": 2, "slice": 4}]
    table = BoxTabled("boxes", num_classes=3)({"image": image, "boxes": entries})["boxes"]
    assert table.tolist() == [[4, 2, 1, 2, 8, 9]]
    for bad, message in [({"box": [1, 2, 12, 9], "label": 1, "slice": 0}, "not inside the 10 x 12 slice"),
                         ({"box": [5, 2, 1, 9], "label": 1, "slice": 0}, "x0 <= x1"),
                         ({"box": [1, 2, 3, 4], "label": 3, "slice": 0}, "label 3 not a foreground class 1..2"),
                         ({"box": [1, 2, 3, 4], "label": 1, "slice": 5}, "slice 5 not in 0..4")]:
        with pytest.raises(VolumeDataError, match=f"case.nii.gz: box 0: .*{message}"):
            BoxTabled("boxes", num_classes=3)({"image": image, "boxes": [bad]})
    check_box_table(np.array([[0, 1, 0, 0, 11, 9]]), (10, 12), 2, 2, "x")  # 2D: the whole image

    images = [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.png")]
    good = {"a.nii.gz": entries, "b.png": [{"box": [0, 0, 3, 3], "label": 1}]}
    (tmp_path / "boxes.json").write_text(json.dumps(good))
    assert read_boxes_file(tmp_path / "boxes.json", images) == {images[0]: entries, images[1]: good["b.png"]}
    for content, message in [({"a.nii.gz": entries}, "no boxes for 1 image.*b.png"),
                             ({**good, "c.png": entries}, "boxes for images not in the data: \\['c.png'\\]"),
                             ({**good, "b.png": [{"box": [0, 0, 3], "label": 1}]}, "'b.png' box 0 is"),
                             ({**good, "b.png": []}, "non-empty list")]:
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(VolumeDataError, match=message):
            read_boxes_file(tmp_path / "bad.json", images)
    with pytest.raises(FileNotFoundError, match="boxes file not found"):
        read_boxes_file(tmp_path / "none.json", images)


# ---------------------------------------------------------------- inferer


def _loop_reference(net: LVMMedSAM, volume: torch.Tensor, table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per box: resize its slice, run the network on it with the scaled box, resize back; max per class."""
    c, h, w, d = volume.shape
    out = torch.full((num_classes, h, w, d), -1e4)
    out[0] = 0
    for s, label, *box in table.tolist():
        image = F.interpolate(volume[None, ..., int(s)], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        scaled = torch.tensor(box) * torch.tensor([SIZE / w, SIZE / h, SIZE / w, SIZE / h])
        logits = F.interpolate(net(image, scaled[None]), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        out[int(label), ..., int(s)] = torch.maximum(out[int(label), ..., int(s)], logits)
    return out


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_box_inferer_equals_a_loop_over_boxes_and_keeps_the_layout(net, slice_axis, one_thread):
    torch.manual_seed(0)
    volume = torch.randn(3, 20, 28, 4)  # (C, H, W, D), slices last
    label = torch.zeros(20, 28, 4, dtype=torch.int64)
    label[2:9, 3:12, 0] = 1
    label[12:18, 20:26, 0] = 1
    label[5:15, 5:25, 2] = 2
    label[6:8, 6:9, 2] = 1
    table = torch.as_tensor(label_boxes(label, "component", 2))
    expected = _loop_reference(net, volume, table, 3)
    inputs = MetaTensor(torch.movedim(volume, -1, 1 + slice_axis)[None], affine=torch.diag(torch.tensor([2., 3, 4, 1])))
    inferer = BoxPromptInferer(3, slice_axis=slice_axis, sw_batch_size=1, box_batch_size=2)
    with torch.no_grad():
        out = inferer(inputs, net, table[None])
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, inputs.affine)
    assert out.shape == (1, 3, *inputs.shape[2:])
    torch.testing.assert_close(torch.movedim(out[0].as_tensor(), 1 + slice_axis, -1), expected, atol=1e-4, rtol=1e-4)
    # a 2D image: its boxes on slice 0
    with torch.no_grad():
        out2d = inferer(volume[None, ..., 2], net, table[table[:, 0] == 2] * torch.tensor([0, 1, 1, 1, 1, 1]))
    torch.testing.assert_close(out2d[0], expected[..., 2], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="labels in 1..2"):
        inferer(volume[None, ..., 0], net, torch.tensor([[0, 3, 0, 0, 5, 5]]))
    with pytest.raises(TypeError, match="box-prompted network"):
        inferer(volume[None, ..., 0], torch.nn.Identity(), table)
