"""The Processing algorithms of the RSRefSeg provider."""

from __future__ import annotations

from .features import EncodeFeatures, SegmentFromFeatures
from .segment import SegmentByExpression

ALGORITHMS = (SegmentByExpression, EncodeFeatures, SegmentFromFeatures)

__all__ = ["ALGORITHMS", "EncodeFeatures", "SegmentByExpression", "SegmentFromFeatures"]
