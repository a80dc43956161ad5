"""Per-class metric handlers for MONAI evaluators' ``additional_metrics``: one handler per class, so
StatsHandler, TensorBoard and the run's report log each class's value as a scalar (Dice and IoU of one-hot
segmentations, AP at IoU 0.5 of detections)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.handlers import MeanDice, MeanIoUHandler, from_engine

from lvmmed_monai.engines.detection import DetectionAP

__all__ = ["per_class_handlers", "per_class_dice", "per_class_iou", "per_class_ap"]


def _channel_transform(channel: int) -> Callable[[Any], tuple[list, list]]:
    def select(output: Any) -> tuple[list, list]:
        preds, labels = from_engine(["pred", "label"])(output)
        return [p[channel : channel + 1] for p in preds], [y[channel : channel + 1] for y in labels]

    return select


def per_class_handlers(handler: Callable[..., Any], num_classes: int, class_names: Sequence[str] | None = None,
                       include_background: bool = False, prefix: str = "") -> dict[str, Any]:
    """``{prefix + name: handler(...)}``: one MONAI metric handler (``MeanDice``, ``MeanIoUHandler``, ...) per
    class of one-hot ``pred`` / ``label`` (``(C, ...)`` per item after ``AsDiscreted(to_onehot=C)``), for a
    MONAI evaluator's ``additional_metrics``, so StatsHandler / TensorBoard log each class as a scalar."""
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for num_classes={num_classes}")
    first = 0 if include_background else 1
    return {f"{prefix}{names[c]}": handler(include_background=True, output_transform=_channel_transform(c))
            for c in range(first, num_classes)}


def per_class_dice(num_classes: int, class_names: Sequence[str] | None = None, include_background: bool = False,
                   prefix: str = "val_dice_") -> dict[str, MeanDice]:
    """One MONAI ``MeanDice`` per class (see :func:`per_class_handlers`)."""
    return per_class_handlers(MeanDice, num_classes, class_names, include_background, prefix)


def per_class_iou(num_classes: int, class_names: Sequence[str] | None = None, include_background: bool = False,
                  prefix: str = "val_iou_") -> dict[str, MeanIoUHandler]:
    """One MONAI ``MeanIoUHandler`` per class (see :func:`per_class_handlers`)."""
    return per_class_handlers(MeanIoUHandler, num_classes, class_names, include_background, prefix)


def per_class_ap(num_classes: int, class_names: Sequence[str] | None = None, prefix: str = "val_ap50_",
                 iou_threshold: float = 0.5, max_detections: int = 100) -> dict[str, DetectionAP]:
    """``{prefix + name: DetectionAP(class_index=c)}`` for the classes 1..C, for an evaluator's
    ``additional_metrics`` (StatsHandler / TensorBoard log each class's AP as a scalar)."""
    names = list(class_names) if class_names else [str(c) for c in range(1, int(num_classes))]
    if len(names) != int(num_classes) - 1:
        raise ValueError(f"{len(names)} class names {names} for num_classes={num_classes} (classes + background)")
    return {f"{prefix}{name}": DetectionAP(num_classes, c + 1, iou_threshold, max_detections)
            for c, name in enumerate(names)}
