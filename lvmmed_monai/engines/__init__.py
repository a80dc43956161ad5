"""Training workflows on MONAI's engines: GM-SSL pretraining (the ``lvmmed_pretrain`` bundle wires these) and
the 2D-3D hybrid workflows (``lvmmed_hybrid3d``), 2D / slice-by-slice segmentation (``lvmmed_seg``) and 2D
classification (``lvmmed_cls``)."""

# re-exported: bundle configs read knobs and encoder facts as lvmmed_monai.engines.<name>
from lvmmed_monai.config_values import as_bool, as_int, missing_setting, optional_path
from lvmmed_monai.encoders import build_encoder, input_normalization
from lvmmed_monai.engines.classification import BalancedAccuracy, BalancedAccuracyMetric, ClassificationReport
from lvmmed_monai.engines.detection import (
    DetectionAP,
    DetectionLoss,
    DetectionPrepareBatch,
    DetectionReport,
    ap_from_matches,
    average_precision,
    detection_loss_terms,
    match_detections,
)
from lvmmed_monai.engines.distributed import (
    GlobalBatchNorm2d,
    convert_sync_batchnorm,
    distributed_setup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    wrap_ddp,
)
from lvmmed_monai.engines.handlers import (
    AtomicCheckpointSaver,
    EncoderExportHandler,
    FirstOrderWarmup,
    OnlineProbe,
    attach_checkpointing,
    latest_checkpoint,
)
from lvmmed_monai.engines.hybrid import (
    Joint3DTrainer,
    load_hybrid_backbone,
    load_stage_checkpoint,
    resolve_checkpoint,
)
from lvmmed_monai.engines.metrics import per_class_ap, per_class_dice, per_class_handlers, per_class_iou
from lvmmed_monai.engines.pretrain import (
    LVMMedPretrainModel,
    LVMMedPretrainTrainer,
    RNGState,
    epoch_means,
    halving_milestones,
    view_inputs,
)
from lvmmed_monai.engines.progress import (
    TrainingProgressBar,
    TrainingSummary,
    every,
    format_duration,
    output_scalars,
    progress_enabled,
)
from lvmmed_monai.engines.segmentation import SegmentationReport
from lvmmed_monai.engines.step import GradientClipHandler, amp_step, clip_gradients

__all__ = [
    "as_bool", "as_int", "missing_setting", "view_inputs",
    "LVMMedPretrainModel", "LVMMedPretrainTrainer", "RNGState", "build_encoder", "epoch_means", "halving_milestones",
    "input_normalization", "AtomicCheckpointSaver", "EncoderExportHandler", "FirstOrderWarmup",
    "OnlineProbe", "latest_checkpoint", "attach_checkpointing", "GlobalBatchNorm2d", "distributed_setup",
    "convert_sync_batchnorm", "wrap_ddp", "init_distributed", "get_rank", "get_world_size", "is_main_process",
    "Joint3DTrainer", "GradientClipHandler", "load_stage_checkpoint", "load_hybrid_backbone", "optional_path",
    "per_class_dice", "per_class_handlers", "resolve_checkpoint", "per_class_iou", "SegmentationReport",
    "BalancedAccuracyMetric", "BalancedAccuracy", "ClassificationReport",
    "DetectionPrepareBatch", "DetectionLoss", "detection_loss_terms", "match_detections",
    "ap_from_matches", "average_precision", "DetectionAP", "per_class_ap", "DetectionReport",
    "amp_step", "clip_gradients", "TrainingProgressBar", "TrainingSummary", "every", "format_duration",
    "output_scalars", "progress_enabled",
]
