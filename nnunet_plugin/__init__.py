"""nnU-Net v2 trainers for LVM-Med encoders, found through ``nnUNet_extTrainer``.

``export nnUNet_extTrainer=$(lvmmed nnunet-path)`` then ``nnUNetv2_train DATASET 2d FOLD -tr LVMMedTrainer``.
The trainers only wire :mod:`lvmmed_monai` into nnU-Net; no model code lives here.
"""

from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent

__all__ = ["PLUGIN_DIR"]
