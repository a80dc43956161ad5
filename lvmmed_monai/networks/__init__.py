"""Networks built on LVM-Med encoders: 2D U-Nets, classifier, detector, 2D-3D hybrid networks, MONAI's
CellSamWrapper (VISTA-2D cell segmentation)."""

from lvmmed_monai.networks.cell_sam import lvmmed_cell_sam
from lvmmed_monai.networks.classifier import LVMMedClassifier
from lvmmed_monai.networks.detector import lvmmed_faster_rcnn
from lvmmed_monai.networks.factory import SEGMENTATION_NETS_2D, classification_net_2d, segmentation_net_2d
from lvmmed_monai.networks.hybrid import LVMMedHybridBackbone, LVMMedHybridClassifier, LVMMedHybridSegNet
from lvmmed_monai.networks.inter_slice import InterSliceTransformer
from lvmmed_monai.networks.sam import LVMMedSAM
from lvmmed_monai.networks.unet import LVMMedFlexibleUNet
from lvmmed_monai.networks.vit_unetr import LVMMedViTUNETR

__all__ = [
    "LVMMedFlexibleUNet", "LVMMedViTUNETR", "LVMMedClassifier", "lvmmed_faster_rcnn",
    "LVMMedHybridBackbone", "LVMMedHybridClassifier", "LVMMedHybridSegNet", "InterSliceTransformer",
    "segmentation_net_2d", "SEGMENTATION_NETS_2D", "classification_net_2d", "LVMMedSAM",
    "lvmmed_cell_sam",
]
