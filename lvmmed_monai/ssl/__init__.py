"""LVM-Med's graph-matching self-supervised learning (NeurIPS 2023, Sec. 3.2), one concept per module.

* the two augmented views per image with their original-image coordinate maps are data transforms
  (:mod:`lvmmed_monai.data.views`), re-exported here with the method;
* :mod:`~lvmmed_monai.ssl.graph`: kNN graphs, the GCN of Eq. 1 and the projector;
* :mod:`~lvmmed_monai.ssl.affinity`: vertex (global + local, Eq. 2-3) and edge (Eq. 4) affinities;
* :mod:`~lvmmed_monai.ssl.matching`: batched LAP / QAP solvers (``solve_qap``);
* :mod:`~lvmmed_monai.ssl.imle`: IMLE gradients through the solver (Eq. 6, Algorithm 1), Hamming loss, the
  per-graph noise key (``NoiseKey``);
* :mod:`~lvmmed_monai.ssl.loss`: ``LVMMedLoss``, the whole step;
* :mod:`~lvmmed_monai.ssl.contrastive`: ``SimCLRLoss``, the InfoNCE baseline on the same inputs;
* :mod:`~lvmmed_monai.ssl.joint3d`: the Joint 2D-3D SSL tasks (Sinkhorn clustering, masked slices).
"""

from lvmmed_monai.data.views import LVMMedViewsd, coordinate_grid, pool_coords, transform_with_coords
from lvmmed_monai.ssl.affinity import edge_affinity, global_affinity, local_affinity, vertex_affinity
from lvmmed_monai.ssl.contrastive import SimCLRLoss
from lvmmed_monai.ssl.graph import GCN, Projector, knn_adjacency, knn_graph, normalized_adjacency
from lvmmed_monai.ssl.imle import NoiseKey, hamming_loss, imle_qap
from lvmmed_monai.ssl.joint3d import ClusteringAgreementLoss, Joint3DLoss, MaskedSliceModeling, set_training_stage
from lvmmed_monai.ssl.loss import GraphAffinities, LVMMedLoss, LVMMedLossOutput
from lvmmed_monai.ssl.matching import QAP_SOLVERS, lawler_from_edges, qap_objective, solve_lap, solve_qap

__all__ = [
    "LVMMedViewsd", "coordinate_grid", "pool_coords", "transform_with_coords",
    "GCN", "Projector", "knn_graph", "knn_adjacency", "normalized_adjacency",
    "global_affinity", "local_affinity", "vertex_affinity", "edge_affinity",
    "QAP_SOLVERS", "lawler_from_edges", "qap_objective", "solve_lap", "solve_qap",
    "imle_qap", "hamming_loss", "NoiseKey",
    "LVMMedLoss", "LVMMedLossOutput", "GraphAffinities", "SimCLRLoss",
    "ClusteringAgreementLoss", "MaskedSliceModeling", "Joint3DLoss", "set_training_stage",
]
