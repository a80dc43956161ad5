"""Data: generated phantoms and official-layout checkpoints for demos and tests; pretraining collections."""

from lvmmed_monai.data.phantoms import shape_phantoms, write_default_collection
from lvmmed_monai.data.pretrain import LoadSliced, PretrainDataError, collect_files, modality_weights, prepare_slices
from lvmmed_monai.data.sampling import GlobalBatchSampler, SeededViewsDataset
from lvmmed_monai.data.synthetic import official_resnet50_state, official_vit_b_state, phantom_batch

__all__ = [
    "official_resnet50_state", "official_vit_b_state", "phantom_batch",
    "write_default_collection", "shape_phantoms",
    "collect_files", "prepare_slices", "modality_weights", "LoadSliced", "PretrainDataError",
    "GlobalBatchSampler", "SeededViewsDataset",
]
