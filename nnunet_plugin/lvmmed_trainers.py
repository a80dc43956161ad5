"""LVM-Med trainers for nnU-Net v2 (2d): ResNet-50 U-Net with deep supervision, and variants.

Pretrained weights come from the file in ``$LVMMED_WEIGHTS`` (checked when the trainer is created, loaded
strictly into the encoder in ``initialize``, before the first epoch). Random init only through the
``_scratch`` variants, so that comparisons are explicit.

Fine-tuning choices (why): AdamW instead of nnU-Net's SGD(0.99 momentum, lr 1e-2), which is tuned for
random init and wrecks pretrained features early; decoder lr 1e-3, encoder lr 1e-4 (10x lower, as is
usual for pretrained backbones and LVM-Med's own fine-tuning with Adam); linear warm-up over the first 5%
of epochs (at least 1) then nnU-Net's poly decay per group; gradient clipping at 12 as nnU-Net does. AdamW
runs fused (a single kernel over all tensors): its per-parameter loop dominated the CPU step time.
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from lvmmed_monai.networks.ds_unet import LVMMedDeepSupervisionUNet, deep_supervision_scales
from lvmmed_monai.networks.vit_unetr import LVMMedViTUNETR
from lvmmed_monai.optim import WarmupPolyLR, encoder_decoder_param_groups
from lvmmed_monai.weights import CheckpointError, detect_layout, read_checkpoint, resolve_weights, strip_prefixes

WEIGHTS_ENV = "LVMMED_WEIGHTS"
# the checkpoint layouts each trainer family loads (its encoder's own, or one load_weights converts)
_TRAINER_LAYOUTS = {"LVMMedTrainer": ("torchvision_resnet50",), "LVMMedViTTrainer": ("sam_vit_b", "timm_samvit_b")}


class LVMMedTrainer(nnUNetTrainer):
    """nnU-Net 2d training of the LVM-Med ResNet-50 U-Net (weights from ``$LVMMED_WEIGHTS``)."""

    pretrained = True
    weights_layouts: tuple[str, ...] = _TRAINER_LAYOUTS["LVMMedTrainer"]
    freeze_encoder_epochs = 0  # > 0: train the decoder only for that many epochs, then unfreeze
    encoder_lr_scale = 0.1
    warmup_fraction = 0.05

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.weights_path = self._weights_from_env() if self.pretrained else None

    @classmethod
    def _weights_from_env(cls) -> str:
        """The checkpoint in ``$LVMMED_WEIGHTS``, checked (exists, readable, one of :attr:`weights_layouts`)
        when the trainer is created, before nnU-Net writes anything."""
        value = os.environ.get(WEIGHTS_ENV)
        if not value:
            raise RuntimeError(
                f"{cls.__name__} needs pretrained LVM-Med weights: set {WEIGHTS_ENV}=/path/to/checkpoint "
                "(see `lvmmed weights list`), or train from random init explicitly with a `_scratch` trainer."
            )
        path = resolve_weights(value)
        layout = detect_layout(strip_prefixes(read_checkpoint(path)[0])[0])
        if layout not in cls.weights_layouts:
            other = next((t for t, layouts in _TRAINER_LAYOUTS.items() if layout in layouts), None)
            raise CheckpointError(
                f"{WEIGHTS_ENV}={path} holds {layout or 'unknown-layout'} weights; {cls.__name__} takes "
                f"{' or '.join(cls.weights_layouts)} (`lvmmed weights inspect {path}` shows what it holds): "
                + (f"use -tr {other} for these weights, or " if other else "")
                + f"point {WEIGHTS_ENV} at the matching checkpoint (`lvmmed weights list`)."
            )
        return str(path)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return LVMMedDeepSupervisionUNet(
            in_channels=num_input_channels,
            out_channels=num_output_channels,
            ds_scales=deep_supervision_scales(configuration_manager.pool_op_kernel_sizes),
            deep_supervision=enable_deep_supervision,
        )

    def initialize(self) -> None:
        if self.was_initialized:
            return
        super().initialize()
        if self.weights_path is not None:
            report = self._unwrapped().encoder.load_weights(self.weights_path, strict=True)
            self.print_to_log_file(f"LVM-Med encoder weights from {self.weights_path}:\n{report.summary()}")
        self._set_encoder_frozen(self.freeze_encoder_epochs > 0)

    def _unwrapped(self) -> nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)

    def _set_encoder_frozen(self, frozen: bool) -> None:
        self._unwrapped().encoder.requires_grad_(not frozen)

    def configure_optimizers(self):
        groups = encoder_decoder_param_groups(self._unwrapped(), self.initial_lr, self.encoder_lr_scale)
        groups = [dict(g, params=list(g["params"])) for g in groups]
        # fused: one kernel over all tensors; the per-parameter loop costs ~5x more per step on CPU (32M params)
        fused = self.device.type in ("cpu", "cuda")
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, weight_decay=self.weight_decay, fused=fused)
        warmup = max(1, round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupPolyLR(optimizer, self.num_epochs, warmup_steps=warmup)

    def on_train_epoch_start(self) -> None:
        if self.freeze_encoder_epochs and self.current_epoch == self.freeze_encoder_epochs:
            self._set_encoder_frozen(False)
            self.print_to_log_file(f"epoch {self.current_epoch}: encoder unfrozen")
        super().on_train_epoch_start()

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._unwrapped().decoder.deep_supervision = enabled


class LVMMedTrainer_scratch(LVMMedTrainer):
    """Same network and schedule, random initialisation (the baseline for pretrained comparisons)."""

    pretrained = False


class LVMMedTrainer_frozenEncoder(LVMMedTrainer):
    """Decoder-only training: the pretrained encoder stays frozen for all epochs."""

    def on_train_epoch_start(self) -> None:
        self._set_encoder_frozen(True)
        nnUNetTrainer.on_train_epoch_start(self)

    def initialize(self) -> None:
        super().initialize()
        self._set_encoder_frozen(True)


class LVMMedTrainer_warmupUnfreeze(LVMMedTrainer):
    """Linear-probe-like start: decoder only for the first 10% of epochs (at least 1), then all layers."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.freeze_encoder_epochs = max(1, self.num_epochs // 10)


class LVMMedTrainer_1epoch(LVMMedTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """One epoch: a smoke test of the whole pipeline."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1


class LVMMedTrainer_1epoch_50iters(LVMMedTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """One epoch of 50 training and 5 validation iterations: a CPU-sized smoke run of train + predict."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 50, 5


class LVMMedTrainer_5epochs(LVMMedTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """Five epochs, for quick checks."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class LVMMedTrainer_scratch_5epochs(LVMMedTrainer_scratch):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """Five epochs from random init."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class LVMMedViTTrainer(LVMMedTrainer):
    """ViT-B (SAM layout weights in ``$LVMMED_WEIGHTS``) with the UNETR-style decoder of lvmmed_monai.

    The UNETR decoder has one output, so deep supervision is disabled cleanly (nnU-Net then neither
    downsamples targets nor wraps the loss). ``img_size`` is the plan's patch size rounded up to 16; the
    network pads other inputs to a multiple of 16 and crops the logits back.
    """

    weights_layouts = _TRAINER_LAYOUTS["LVMMedViTTrainer"]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        patch = max(configuration_manager.patch_size)
        return LVMMedViTUNETR(in_channels=num_input_channels, out_channels=num_output_channels,
                              img_size=-(-patch // 16) * 16)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        """No deep-supervision outputs to switch."""


class LVMMedViTTrainer_scratch(LVMMedViTTrainer):
    pretrained = False


class LVMMedViTTrainer_5epochs(LVMMedViTTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """Five epochs, for quick checks."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
