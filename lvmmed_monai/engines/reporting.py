"""Helpers shared by the evaluation reports (:class:`~lvmmed_monai.engines.SegmentationReport`,
:class:`~lvmmed_monai.engines.ClassificationReport`, :class:`~lvmmed_monai.engines.DetectionReport`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["case_name", "finite_or_none"]


def case_name(item: Any, key: str, index: int) -> str:
    """The file an evaluated item came from (its ``key``'s MetaTensor ``filename_or_obj``), else ``case_<index>``."""
    meta = getattr(item.get(key), "meta", None) if isinstance(item, Mapping) else None
    name = meta.get("filename_or_obj") if meta else None
    return str(name) if name else f"case_{index}"


def finite_or_none(value: float) -> float | None:
    """NaN as None, so JSON reports hold ``null`` instead of the non-standard ``NaN``."""
    return None if math.isnan(value) else value
