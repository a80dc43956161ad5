"""Generated stand-ins for real data and weights, for the demos, the bundles' built-in data and the tests:
shape, CT / MR / X-ray / ultrasound and volume phantoms with their labels, detection phantoms, nnU-Net raw
datasets, and checkpoints with random weights in the official LVM-Med layouts. Nothing here is downloaded.

Below :mod:`lvmmed_monai.data` (whose loaders fall back on these collections when no data is given); above the
encoders and the weight layouts.
"""

from lvmmed_monai.demo.detection import DETECTION_CLASSES, detection_phantoms, write_detection_phantoms
from lvmmed_monai.demo.phantoms import SHAPE_CLASSES, shape_phantoms, write_default_collection, write_shape_phantoms
from lvmmed_monai.demo.synthetic import (
    IMAGE_PHANTOM_CLASSES,
    official_resnet50_state,
    official_vit_b_state,
    phantom_batch,
    write_nnunet_raw_dataset,
    write_phantom_images,
)
from lvmmed_monai.demo.volumes import write_phantom_volumes

__all__ = [
    "official_resnet50_state", "official_vit_b_state", "phantom_batch", "write_nnunet_raw_dataset",
    "write_phantom_images", "IMAGE_PHANTOM_CLASSES", "SHAPE_CLASSES", "shape_phantoms", "write_default_collection",
    "write_shape_phantoms", "write_phantom_volumes", "DETECTION_CLASSES", "detection_phantoms",
    "write_detection_phantoms",
]
