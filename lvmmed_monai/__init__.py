"""lvmmed-monai: LVM-Med encoders, graph-matching SSL and 2D-3D hybrid backbones for MONAI and nnU-Net.

Importing the package registers ``lvmmed_resnet50`` as a MONAI FlexibleUNet backbone.
"""

from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from lvmmed_monai.encoders import ENCODERS, LVMMedResNet50, LVMMedViTB, load_encoder
from lvmmed_monai.weights import CheckpointError, CheckpointMismatchError, LoadReport, load_weights

__version__ = "0.1.0"

if "lvmmed_resnet50" not in FLEXUNET_BACKBONE.register_dict:
    FLEXUNET_BACKBONE.register_class(LVMMedResNet50)

__all__ = [
    "ENCODERS",
    "load_encoder",
    "load_weights",
    "LVMMedResNet50",
    "LVMMedViTB",
    "LoadReport",
    "CheckpointError",
    "CheckpointMismatchError",
]
