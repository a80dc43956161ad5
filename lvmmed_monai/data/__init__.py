"""Data: pretraining collections (a sharded slice cache, prepared in parallel); 3D volume data sets for the
hybrid bundle; 2D + 3D labeled data for the segmentation bundle; labeled 2D images for the classification bundle;
atomic image writers. The generated phantoms and official-layout checkpoints live in :mod:`lvmmed_monai.demo`
(re-exported here)."""

from lvmmed_monai.data.classification import (
    classification_inputs,
    image_classification_data,
    image_classification_datalist,
)
from lvmmed_monai.data.loading import (
    CheckedLoadImaged,
    DataError,
    MatchChannelsd,
    PretrainDataError,
    VolumeDataError,
    collect_files,
)
from lvmmed_monai.data.pretrain import LoadSliced, prepare_part, prepare_slices
from lvmmed_monai.data.sampling import GlobalBatchSampler, SeededViewsDataset, dataset_weights, modality_weights
from lvmmed_monai.data.segmentation import (
    RandSliceSamplesd,
    inference_datalist,
    labeled_data,
    labeled_datalist,
)
from lvmmed_monai.data.slice_cache import SliceIndex
from lvmmed_monai.data.volumes import (
    PadDepthCollate,
    classification_data,
    segmentation_data,
    volume_data,
)
from lvmmed_monai.data.writers import AtomicNibabelWriter, AtomicPILWriter
from lvmmed_monai.demo.phantoms import shape_phantoms, write_default_collection, write_shape_phantoms
from lvmmed_monai.demo.synthetic import (
    official_resnet50_state,
    official_vit_b_state,
    phantom_batch,
    write_phantom_images,
)
from lvmmed_monai.demo.volumes import write_phantom_volumes

__all__ = [
    "official_resnet50_state", "official_vit_b_state", "phantom_batch",
    "write_default_collection", "shape_phantoms",
    "DataError", "collect_files", "prepare_slices", "prepare_part", "SliceIndex", "dataset_weights",
    "modality_weights", "LoadSliced", "PretrainDataError",
    "GlobalBatchSampler", "SeededViewsDataset",
    "write_phantom_volumes", "volume_data", "segmentation_data", "classification_data", "PadDepthCollate",
    "VolumeDataError", "AtomicNibabelWriter", "AtomicPILWriter",
    "labeled_data", "labeled_datalist", "inference_datalist", "write_phantom_images", "CheckedLoadImaged",
    "MatchChannelsd", "RandSliceSamplesd",
    "image_classification_data", "image_classification_datalist", "classification_inputs", "write_shape_phantoms",
]
