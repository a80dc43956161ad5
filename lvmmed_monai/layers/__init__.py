"""Attention layers along the slice axis of a volume, for the 2D-3D hybrid backbone.

``SLICE_ATTENTION`` maps a name to a layer class with the interface ``layer(x (B, D, C), key_padding_mask)``;
``SLICE_ATTENTION.register(name, cls)`` adds one for :class:`~lvmmed_monai.networks.hybrid.InterSliceTransformer`.
"""

from lvmmed_monai.layers.deformable_slice_attention import (
    DeformableSliceAttention,
    lengths_from_padding_mask,
    lerp_gather,
)
from lvmmed_monai.layers.neighborhood_slice_attention import (
    NeighborhoodSliceAttention,
    import_natten,
    neighborhood_mask,
)
from lvmmed_monai.registry import Registry

SLICE_ATTENTION = Registry("slice attention", {
    "deformable": DeformableSliceAttention,
    "neighborhood": NeighborhoodSliceAttention,
})

__all__ = [
    "SLICE_ATTENTION",
    "DeformableSliceAttention",
    "NeighborhoodSliceAttention",
    "lengths_from_padding_mask",
    "lerp_gather",
    "neighborhood_mask",
    "import_natten",
]
