"""nnU-Net v2 trainer for the 2D-3D hybrid network on 3D configurations (3d_fullres, 3d_lowres).

``nnUNetv2_train DATASET 3d_fullres FOLD -tr LVMMedHybridTrainer`` with ``nnUNet_extTrainer`` pointing at
this folder: nnU-Net's 3D patches ``(C, Z, Y, X)`` go to :class:`~lvmmed_monai.networks.LVMMedHybridSegNet`
with the first spatial axis (nnU-Net puts the lowest-resolution axis first) as the slice axis: the LVM-Med
ResNet-50 U-Net per slice, deformable attention across slices. Deep-supervision outputs come at the plan's
3D scales (in-plane from the 2D decoder's stages, along z resampled linearly). Weights, optimiser, schedule
and the deep-supervision switch are :class:`~nnunet_plugin.lvmmed_trainers.LVMMedTrainer`'s; only the
network differs.
"""

from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from lvmmed_monai.networks.ds_unet import deep_supervision_scales
from lvmmed_monai.networks.hybrid import LVMMedHybridSegNet
from nnunet_plugin.lvmmed_trainers import LVMMedTrainer


class LVMMedHybridTrainer(LVMMedTrainer):
    """3D nnU-Net training of the hybrid network (ResNet-50 encoder weights from ``$LVMMED_WEIGHTS``)."""

    slice_chunk = 32

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        if len(configuration_manager.patch_size) != 3:
            raise ValueError(
                f"LVMMedHybridTrainer needs a 3D configuration (3d_fullres / 3d_lowres), got a patch size of "
                f"{list(configuration_manager.patch_size)}; for 2d use -tr LVMMedTrainer"
            )
        return LVMMedHybridSegNet(
            in_channels=num_input_channels,
            out_channels=num_output_channels,
            ds_scales=deep_supervision_scales(configuration_manager.pool_op_kernel_sizes),
            deep_supervision=enable_deep_supervision,
            slice_chunk=LVMMedHybridTrainer.slice_chunk,
        )


class LVMMedHybridTrainer_scratch(LVMMedHybridTrainer):
    """Same network and schedule, random initialisation."""

    pretrained = False


class LVMMedHybridTrainer_5epochs(LVMMedHybridTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """Five epochs, for quick checks."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class LVMMedHybridTrainer_1epoch_5iters(LVMMedHybridTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """One epoch of 5 training and 2 validation iterations: a CPU-sized smoke run of train + predict."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 5, 2


class LVMMedHybridTrainer_2epochs_5iters(LVMMedHybridTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        """``_1epoch_5iters`` with a second epoch: continued with ``--c`` from a one-epoch checkpoint, a
        CPU-sized check that nnU-Net resumes the hybrid network (epoch counter, weights, optimiser state)."""
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 5, 2
