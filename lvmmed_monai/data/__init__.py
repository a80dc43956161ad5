"""Data: generated phantoms and official-layout checkpoints for demos and tests."""

from lvmmed_monai.data.synthetic import official_resnet50_state, official_vit_b_state, phantom_batch

__all__ = ["official_resnet50_state", "official_vit_b_state", "phantom_batch"]
