"""LVM-Med checkpoints: registry, safe reading, layout detection and conversion, loading with a report.

One home for everything about weight files (DESIGN.md):

* :data:`OFFICIAL_WEIGHTS` lists the released LVM-Med files, their layouts and where users get them.
  We never ship, download silently or redistribute them (licence: non-commercial, see
  :data:`LICENCE_NOTE`); the user passes a local file, or explicitly a URL or ``hf://repo/file``.
* :func:`read_checkpoint` loads with ``torch.load(..., weights_only=True)`` and unwraps the usual
  containers (``state_dict``, ``model``, ``network_weights``, ``encoder``...); it refuses NaN/Inf tensors
  (``check_finite``), names what a refused pickle would build, and names the checkpoint inside a folder.
* :func:`detect_layout` tells torchvision ResNet-50, SAM ViT-B and timm ``samvit`` layouts apart;
  :func:`sam_to_timm` / :func:`timm_to_sam` convert (pure functions, dict in, dict out, as timm's
  ``checkpoint_filter_fn``); :func:`resize_vit_state` resizes ``pos_embed`` and the relative-position
  tables for other image sizes (timm's filter only renames keys).
* :func:`load_weights` puts a checkpoint into an encoder and returns a :class:`LoadReport`; in strict
  mode (the default) any mismatch raises :class:`CheckpointMismatchError` listing the keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models import adapt_input_conv
from torch import nn

from lvmmed_monai.io import atomic_open, save_atomic

__all__ = [
    "OFFICIAL_WEIGHTS",
    "LICENCE_NOTE",
    "LAYOUTS",
    "WeightsInfo",
    "LoadReport",
    "CheckpointError",
    "CheckpointMismatchError",
    "DownloadError",
    "CHECKPOINT_SUFFIXES",
    "read_checkpoint",
    "nonfinite_tensors",
    "strip_prefixes",
    "detect_layout",
    "sam_to_timm",
    "timm_to_sam",
    "convert_state_dict",
    "CONVERTIBLE_LAYOUTS",
    "adapt_in_channels",
    "resize_vit_state",
    "load_weights",
    "resolve_weights",
    "download",
    "PRETRAIN_META_KEY",
    "LoadsWeights",
    "export_encoder",
    "ADAPTATION_PLAN_NAME",
]

PRETRAIN_META_KEY = "lvmmed_meta"  # our pretraining checkpoints: {"encoder": state, "lvmmed_meta": {...}, ...}
WRAPPER_KEYS = ("state_dict", "model", "network_weights", "encoder", "model_state_dict", "net", "network")
KNOWN_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.", "image_encoder.")
LAYOUTS = {
    "torchvision_resnet50": "torchvision ResNet-50 state dict (conv1.*, bn1.*, layer1..4.*; fc.* dropped)",
    "sam_vit_b": "SAM ImageEncoderViT ViT-B (patch_embed.*, pos_embed, blocks.N.mlp.lin1.*, neck.*)",
    "timm_samvit_b": "timm samvit_base_patch16 (as SAM but blocks.N.mlp.fc1.*)",
    "sam_full": "a whole SAM model (image_encoder.*, prompt_encoder.*, mask_decoder.*), e.g. sam_vit_b_01ec64.pth",
}

LICENCE_NOTE = (
    "LVM-Med weights are for non-commercial research use only. The LVM-Med README states "
    "CC BY-NC-ND (no version given), while the repository's LICENSE file states CC BY-NC-SA 4.0; read both. "
    "lvmmed-monai does not ship, mirror or download them on its own: obtain them yourself "
    "and pass the local file (or an explicit URL / hf:// address)."
)


@dataclass(frozen=True)
class WeightsInfo:
    """A released LVM-Med file: where users get it and which layout it is in."""

    name: str
    filename: str
    layout: str
    encoder: str
    sources: tuple[str, ...]
    sha256: str | None = None


OFFICIAL_WEIGHTS: dict[str, WeightsInfo] = {
    "lvmmed_resnet50": WeightsInfo(
        name="lvmmed_resnet50",
        filename="lvmmed_resnet.torch",
        layout="torchvision_resnet50",
        encoder="lvmmed_resnet50",
        sources=(
            "README of github.com/duyhominhnguyen/LVM-Med, table 'LVM-Med Pretrained Models', "
            "row ResNet-50 (a file-host link whose id has changed over time)",
            "Hugging Face Hub: a model repository holding lvmmed_resnet.torch; pass hf://<repo_id>/lvmmed_resnet.torch",
        ),
    ),
    "lvmmed_vit_b": WeightsInfo(
        name="lvmmed_vit_b",
        filename="lvmmed_vit.pth",
        layout="sam_vit_b",
        encoder="lvmmed_vit_b",
        sources=(
            "README of github.com/duyhominhnguyen/LVM-Med, table 'LVM-Med Pretrained Models', "
            "row ViT-B (a file-host link whose id has changed over time)",
            "Hugging Face Hub: a model repository holding lvmmed_vit.pth; pass hf://<repo_id>/lvmmed_vit.pth",
        ),
    ),
}


class CheckpointError(ValueError):
    """A weights file that cannot be read as a plain tensor checkpoint."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did: keys loaded, missing, unexpected, mismatched, ignored, converted."""

    expected_layout: str
    detected_layout: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def summary(self, limit: int = 5) -> str:
        def few(items: list[Any]) -> str:
            shown = ", ".join(str(i) for i in items[:limit])
            return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

        lines = [
            f"expected layout: {self.expected_layout} ({LAYOUTS.get(self.expected_layout, '?')})",
            f"detected layout: {self.detected_layout or 'unknown'}",
            f"loaded: {len(self.loaded)} tensors",
        ]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {few(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): {few(self.unexpected)}")
        if self.shape_mismatches:
            shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatches]
            lines.append(f"shape mismatches ({len(shown)}): {few(shown)}")
        if self.ignored:
            lines.append(f"ignored outside the encoder ({len(self.ignored)}): {few(self.ignored)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the encoder; the message lists them."""

    def __init__(self, report: LoadReport, source: str = "", hint: str = "") -> None:
        self.report = report
        head = f"checkpoint {source!s} does not match" if source else "checkpoint does not match"
        msg = f"{head} the expected layout '{report.expected_layout}'.\n{report.summary()}"
        super().__init__(msg + (f"\nhint: {hint}" if hint else ""))


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".torch", ".ckpt", ".bin", ".tar", ".model")


def _folder_error(path: Path) -> IsADirectoryError:
    """A folder passed where a weights file belongs: name the checkpoint inside it when there is exactly one."""
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(CHECKPOINT_SUFFIXES))
    if len(found) == 1:
        hint = f"it holds one checkpoint: pass {found[0]}"
    elif found:
        hint = f"it holds {len(found)} checkpoints ({', '.join(p.name for p in found[:5])}): pass the one you mean"
    else:
        hint = f"it holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}): pass the path of the file itself"
    return IsADirectoryError(f"weights {path} is a folder, not a checkpoint file; {hint}.")


def _pickled_globals(path: Path) -> list[str] | None:
    """The Python objects (``module.name``) a pickle would build, read from its opcodes without running it.

    ``None`` when the file does not parse as a pickle (truncated, corrupt). Reads ``data.pkl`` inside a
    ``torch.save`` zip archive, else the file itself; ``STACK_GLOBAL`` names come from the strings pushed or
    recalled from the memo just before it.
    """
    import pickletools

    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                zf = stack.enter_context(zipfile.ZipFile(path))
                inner = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if inner is None:
                    return None
                fh = stack.enter_context(zf.open(inner))
            else:
                fh = stack.enter_context(open(path, "rb"))
            return _globals_in(pickletools.genops(fh))
    except Exception:  # anything the opcode parser cannot read: not a (complete) pickle
        return None


def _globals_in(ops: Iterator[tuple[Any, Any, Any]]) -> list[str]:
    """``module.name`` of every object a stream of pickle opcodes (``pickletools.genops``) would build."""
    names: list[str] = []
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _ in ops:
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(int(arg)))
        elif op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            module, name = strings[-2:] if len(strings) >= 2 else (None, None)
            names.append(f"{module}.{name}" if module and name else "<object>")
    return names


def _unpickling_error(path: Path, err: Exception) -> CheckpointError:
    """Why ``torch.load(weights_only=True)`` refused ``path``: Python objects it will not build, or a broken file."""
    blocked = re.findall(r"GLOBAL ([\w.]+)", str(err))  # torch names the object it refused, when it got that far
    names = blocked or _pickled_globals(path)
    if not names:
        return CheckpointError(f"could not read {path}: truncated or corrupt file ({err!s:.200}). Download or "
                               "export it again.")
    shown = "it would build " + ", ".join(list(dict.fromkeys(names))[:5])
    return CheckpointError(
        f"refused to load {path}: the file holds pickled Python objects, not only tensors ({shown}); safe loading "
        "(torch.load(weights_only=True)) refuses them because unpickling them could run code. If you trust the "
        "file's source, convert it once: `sd = torch.load(path, weights_only=False)`, then save the state dict of "
        "tensors alone with `torch.save(sd, new_path)` and pass new_path."
    )


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors of ``state`` that hold NaN or Inf values."""
    return [k for k, v in state.items()
            if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]


def read_checkpoint(
    source: str | os.PathLike | Mapping[str, Any], *, check_finite: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint safely and return ``(state_dict, extra)``.

    ``torch.load(weights_only=True)`` refuses pickles that would construct arbitrary objects (and so run
    code). Containers are unwrapped: ``{"state_dict": ...}``, ``{"model": ...}``, nnU-Net's
    ``{"network_weights": ...}``, our pretraining checkpoints' ``{"encoder": ...}``; ``extra`` holds the
    remaining top-level entries (e.g. our ``lvmmed_meta``). With ``check_finite`` (the default) a tensor
    holding NaN or Inf raises :class:`CheckpointError` naming it (a damaged file or a diverged run).
    """
    if isinstance(source, Mapping):
        obj: Any = source
        name = "<state dict>"
    else:
        path = Path(source)
        name = str(path)
        if path.is_dir():
            raise _folder_error(path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}. Pass the path of a local checkpoint file.")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _unpickling_error(path, err) from err
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"could not read {name}: truncated or corrupt file ({err}).") from err
    extra: dict = {}
    for _ in range(3):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict.")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            bad = nonfinite_tensors(obj) if check_finite else []
            if bad:
                shown = ", ".join(bad[:8]) + (f", ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
                raise CheckpointError(
                    f"{name}: {len(bad)} of {len(obj)} tensors hold NaN or Inf values ({shown}); the file is "
                    "damaged or comes from a training run that diverged. Use a checkpoint saved before the "
                    "divergence, or pass check_finite=False to load it anyway (e.g. to inspect it)."
                )
            return dict(obj), extra
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        extra.update({k: v for k, v in obj.items() if k != inner})
        obj = obj[inner]
    keys = list(obj)[:8] if isinstance(obj, Mapping) else []
    raise CheckpointError(
        f"{name} is not a state dict of tensors, nor one wrapped in {WRAPPER_KEYS}; top-level keys: {keys}."
    )


def strip_prefixes(
    state: Mapping[str, torch.Tensor], extra_prefixes: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip ``module.`` (DDP) and known wrapper prefixes; return ``(state, ignored_keys)``.

    A prefix is stripped when every key has it, or when the keys under it form a known encoder layout
    (e.g. ``encoder.*`` of a FlexibleUNet checkpoint); keys outside it are returned as ignored.
    """
    sd, ignored = dict(state), []
    prefixes = tuple(extra_prefixes) + KNOWN_PREFIXES
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            sub = {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
            if sub and (len(sub) == len(sd) or detect_layout(sub) is not None):
                ignored += [k for k in sd if not k.startswith(p)]
                sd, changed = sub, True
                break
    return sd, ignored


def detect_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name the layout of a (prefix-free) state dict, or None. See :data:`LAYOUTS`."""
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[0] == 64 and "layer1.0.conv3.weight" in state:
        if "layer3.5.conv1.weight" in state and "layer3.6.conv1.weight" not in state:
            return "torchvision_resnet50"
        return None
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.shape[0] == 768 and "blocks.11.attn.qkv.weight" in state:
        if "blocks.12.attn.qkv.weight" in state:
            return None
        if "blocks.0.mlp.lin1.weight" in state:
            return "sam_vit_b"
        if "blocks.0.mlp.fc1.weight" in state:
            return "timm_samvit_b"
    return None


def sam_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM ``ImageEncoderViT`` keys -> timm ``samvit`` keys (``mlp.lin*`` -> ``mlp.fc*``)."""
    return {k.replace(".mlp.lin", ".mlp.fc"): v for k, v in state.items()}


def timm_to_sam(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``samvit`` keys -> SAM ``ImageEncoderViT`` keys (the official ``lvmmed_vit.pth`` layout)."""
    return {k.replace(".mlp.fc", ".mlp.lin"): v for k, v in state.items() if not k.startswith("head.")}


_CONVERSIONS = {  # (from layout, to layout): function
    ("sam_vit_b", "timm_samvit_b"): sam_to_timm,
    ("timm_samvit_b", "sam_vit_b"): timm_to_sam,
}
# convert_state_dict's targets: the encoder layouts (to the same layout: a copy without ResNet fc.*)
CONVERTIBLE_LAYOUTS = ("sam_vit_b", "timm_samvit_b", "torchvision_resnet50")


def convert_state_dict(state: Mapping[str, torch.Tensor], to_layout: str) -> dict[str, torch.Tensor]:
    """Convert a state dict to ``to_layout``; the source layout is detected. Drops ResNet ``fc.*``."""
    src = detect_layout(state)
    if src == to_layout:
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    if (src, to_layout) not in _CONVERSIONS:
        raise CheckpointError(f"no conversion from layout {src or 'unknown'} to {to_layout}; "
                              f"known: {list(CONVERTIBLE_LAYOUTS)}")
    return _CONVERSIONS[(src, to_layout)](state)


def adapt_in_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt an RGB first-layer kernel ``(O, 3, ...)`` to ``in_channels`` inputs (timm's ``adapt_input_conv``).

    1 channel: sum over RGB, so a grey image gives exactly the response to the grey image replicated
    to three channels (what LVM-Med's own examples do). Other counts: the RGB kernels are repeated
    cyclically (R, G, B, R, ...) and scaled by ``3 / in_channels``; for multiples of 3 this keeps the
    response to an image that is the same in every channel, otherwise approximately.
    """
    if weight.shape[1] == in_channels:
        return weight
    return adapt_input_conv(in_channels, weight.float()).to(weight.dtype)


def resize_vit_state(
    state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resize ``pos_embed`` and the ``rel_pos_h/w`` tables to the shapes of ``target``.

    A 1024 x 1024 SAM checkpoint has a 64 x 64 position grid and (2 * 64 - 1)-row relative tables in the
    global-attention blocks; at another image size both must follow the token grid. We resize exactly as
    the models do at run time for other input sizes: ``pos_embed`` with timm's
    ``resample_abs_pos_embed_nhwc`` (bicubic), the tables by linear interpolation as SAM's ``get_rel_pos``.
    timm's checkpoint filter only renames keys, so this step is ours.
    """
    out, notes = dict(state), []
    for key, value in state.items():
        want = target.get(key)
        if want is None or tuple(want.shape) == tuple(value.shape):
            continue
        if key == "pos_embed" and value.ndim == 4:
            out[key] = resample_abs_pos_embed_nhwc(value, list(want.shape[1:3]))
        elif key.endswith((".rel_pos_h", ".rel_pos_w")) and value.ndim == 2 and value.shape[1] == want.shape[1]:
            table = F.interpolate(value.float().t()[None], size=want.shape[0], mode="linear", align_corners=False)
            out[key] = table[0].t().to(value.dtype)
        else:
            continue
        notes.append(f"resized {key} {tuple(value.shape)} -> {tuple(want.shape)}")
    return out, notes


def load_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    prefix: str | None = None,
    check_finite: bool = True,
) -> LoadReport:
    """Load a checkpoint into an LVM-Med encoder and report what happened.

    ``model`` declares ``weights_layout`` (its own key layout) and ``first_conv_key``. The checkpoint is
    read safely, unwrapped, prefix-stripped (plus ``prefix`` if given), converted to the model's layout,
    its first convolution adapted to the model's input channels and ViT position tables resized. In
    strict mode any missing/unexpected key or shape mismatch raises :class:`CheckpointMismatchError`
    before the model is touched; otherwise the matching tensors are loaded and the report returned.
    ``check_finite`` (default) refuses tensors holding NaN or Inf (see :func:`read_checkpoint`).
    """
    expected = getattr(model, "weights_layout", None)
    if expected is None:
        raise TypeError(f"{type(model).__name__} has no `weights_layout`; use an lvmmed_monai encoder.")
    state, extra = read_checkpoint(source, check_finite=check_finite)
    state, ignored = strip_prefixes(state, [prefix] if prefix else [])
    report = LoadReport(expected_layout=expected, detected_layout=detect_layout(state), ignored=ignored)
    meta = extra.get(PRETRAIN_META_KEY)
    if isinstance(meta, Mapping):
        report.notes.append(f"lvmmed pretraining checkpoint: {dict(meta)}")
    if report.detected_layout is not None and report.detected_layout != expected:
        if (report.detected_layout, expected) in _CONVERSIONS:
            report.notes.append(f"converted {report.detected_layout} -> {expected}")
            state = convert_state_dict(state, expected)
    if report.detected_layout == "torchvision_resnet50":
        dropped = [k for k in state if k.startswith("fc.")]
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        if dropped:
            report.notes.append(f"dropped classifier {dropped}")
    target = model.state_dict()
    conv_key = getattr(model, "first_conv_key", None)
    if conv_key in state and conv_key in target and state[conv_key].shape[1] != target[conv_key].shape[1]:
        if state[conv_key].shape[1] == 3:
            state[conv_key] = adapt_in_channels(state[conv_key], target[conv_key].shape[1])
            report.notes.append(f"adapted {conv_key} from 3 to {target[conv_key].shape[1]} input channels")
    state, notes = resize_vit_state(state, target)
    report.notes += notes
    report.missing = [k for k in target if k not in state]
    report.unexpected = [k for k in state if k not in target]
    report.shape_mismatches = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in state.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if strict and not report.ok:
        hint = ""
        keys = list(state)
        if keys and report.detected_layout is None and all("." in k for k in keys):
            first = {k.split(".", 1)[0] for k in keys}
            if len(first) == 1:
                hint = f"all keys start with '{first.pop()}.'; pass prefix='{keys[0].split('.', 1)[0]}.' to strip it"
        name = "" if isinstance(source, Mapping) else str(source)
        raise CheckpointMismatchError(report, source=name, hint=hint)
    bad = {k for k, _, _ in report.shape_mismatches}
    loadable = {k: v for k, v in state.items() if k in target and k not in bad}
    model.load_state_dict(loadable, strict=False)
    report.loaded = sorted(loadable)
    return report


class LoadsWeights:
    """Mixin for encoders: ``load_weights(source)`` resolves, loads and keeps ``self.load_report``."""

    load_report: LoadReport | None = None

    def load_weights(self, weights: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                     check_finite: bool = True) -> LoadReport:
        """Load a checkpoint in any accepted layout/wrapper (see :func:`load_weights`)."""
        source = weights if isinstance(weights, Mapping) else resolve_weights(weights)
        self.load_report = load_weights(self, source, strict=strict, check_finite=check_finite)
        return self.load_report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DownloadError(OSError):
    """A download that failed (no network, refused, HTTP error, timeout, missing ``file://`` path); nothing
    was written."""


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` (http, https or file) to ``dest`` atomically, checking ``sha256`` when given.

    ``timeout`` bounds every wait (connecting, then each read) in seconds, so an unreachable host fails
    instead of hanging. Failures raise :class:`DownloadError` (or :class:`CheckpointError` for a wrong
    sha256) and leave no file, complete or partial, at ``dest``."""
    dest, digest = Path(dest), hashlib.sha256()
    try:
        with atomic_open(dest, suffix=".part") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise CheckpointError(f"sha256 of {url} is {digest.hexdigest()}, expected {sha256}; file discarded. "
                                      "Check the URL and the --sha256 value (sha256sum of the file you expect).")
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer within {timeout:g} s (timeout)"
        raise DownloadError(f"could not download {url}: {reason}; nothing was written to {dest}. Check the URL "
                            "and the network (or proxy), or download the file yourself and pass its local path."
                            ) from err
    return dest


def resolve_weights(
    source: str | os.PathLike, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
    timeout: float = 60.0,
) -> Path:
    """Turn ``source`` into a local file: a path, an explicit URL, or ``hf://<repo_id>/<filename>``.

    URLs are downloaded (atomically) into ``cache_dir`` (default ``$LVMMED_CACHE`` or
    ``~/.cache/lvmmed``) unless already there; ``hf://`` goes through ``huggingface_hub`` (its cache,
    ``HF_HUB_OFFLINE``). The file's sha256 is checked when given. Nothing is downloaded implicitly; a
    download waits at most ``timeout`` seconds for each answer (:func:`download`).
    """
    text = os.fspath(source)
    if text.startswith("hf://"):
        repo_file = text[len("hf://") :]
        repo_id, _, filename = repo_file.rpartition("/")
        if not repo_id or not filename:
            raise ValueError(f"hf:// address must be hf://<owner>/<repo>/<filename>, got {text!r}")
        from huggingface_hub import hf_hub_download

        # huggingface_hub reads HF_HUB_OFFLINE once, at its import: read it here too, so that setting it later
        # in the process (a notebook, a test) still keeps the call off the network
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        path = Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir,
                                    local_files_only=offline))
    elif urllib.parse.urlparse(text).scheme in ("http", "https", "file"):
        root = Path(cache_dir or os.environ.get("LVMMED_CACHE", Path.home() / ".cache" / "lvmmed"))
        path = root / (Path(urllib.parse.urlparse(text).path).name or "weights.pth")
        if not path.is_file():
            download(text, path, sha256=sha256, timeout=timeout)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            raise _folder_error(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file not found: {path}. LVM-Med weights are not shipped; see "
                "`lvmmed weights list` for where to obtain them, then pass the local path."
            )
    if sha256 is not None and _sha256(path) != sha256.lower():
        raise CheckpointError(f"sha256 of {path} is {_sha256(path)}, expected {sha256}: not the file expected. "
                              "Check the --sha256 value, or delete the file and obtain it again.")
    return path


ADAPTATION_PLAN_NAME = "adaptation_plan.json"
_OFFICIAL_LAYOUT = {"torchvision_resnet50": "torchvision_resnet50", "timm_samvit_b": "sam_vit_b"}


def export_encoder(encoder: nn.Module, path: str | os.PathLike, patch_size: tuple[int, int] = (224, 224)) -> Path:
    """Write ``encoder`` in the official LVM-Med layout, plus an nnssl-style ``adaptation_plan.json`` beside it.

    The weights file is what :func:`load_weights`, the bundles and the nnU-Net trainers load (torchvision
    ResNet-50 keys, or SAM ViT keys). The plan follows nnssl's ``AdaptationPlan`` (architecture name, input
    channels, patch size, the state-dict keys of the encoder and of the stem) and adds what a fine-tuning
    tool needs to feed the encoder as it was pretrained: layout, input projection keys and normalisation.
    Both files are written atomically.
    """
    import json

    layout = getattr(encoder, "weights_layout", None)
    if layout not in _OFFICIAL_LAYOUT:
        raise TypeError(f"{type(encoder).__name__} is not an lvmmed_monai encoder (weights_layout={layout!r})")
    official = _OFFICIAL_LAYOUT[layout]
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    path = save_atomic(convert_state_dict(state, official) if official != layout else state, path)
    stem = encoder.first_conv_key.rsplit(".", 1)[0]
    norm = dict(encoder.pretrain_normalization)  # the encoder class's fact (lvmmed_monai.encoders)
    plan = {
        "architecture_name": type(encoder).__name__,
        "num_input_channels": int(state[encoder.first_conv_key].shape[1]),
        "input_patch_size": list(patch_size),
        "state_dict_key_to_encoder": "",
        "state_dict_key_to_stem": stem,
        "keys_to_in_proj": [stem],
        "weights_layout": official,
        "weights_file": path.name,
        "pretrain_normalization": norm,
        "spatial_dims": 2,
        "feature_dim": int(getattr(encoder, "feature_dim", 0)),
        "feature_stride": int(getattr(encoder, "feature_stride", 0)),
    }
    with atomic_open(path.parent / ADAPTATION_PLAN_NAME, "w") as fh:
        json.dump(plan, fh, indent=2)
    return path
