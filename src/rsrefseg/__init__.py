"""RSRefSeg: referring remote-sensing image segmentation with foundation models.

Importing this package has no side effects: nothing is downloaded, no model is built and no
global state (threads, seeds, logging) is changed. Heavy names are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Predictor", "RSRefSeg", "RSRefSegConfig", "RSRefSegOutput", "__version__", "optimize_for_inference"]

if TYPE_CHECKING:  # pragma: no cover
    from rsrefseg.config import RSRefSegConfig
    from rsrefseg.inference.predictor import Predictor
    from rsrefseg.modeling.optimize import optimize_for_inference
    from rsrefseg.modeling.rsrefseg import RSRefSeg, RSRefSegOutput

_LAZY = {
    "RSRefSeg": "rsrefseg.modeling.rsrefseg",
    "RSRefSegOutput": "rsrefseg.modeling.rsrefseg",
    "RSRefSegConfig": "rsrefseg.config",
    "Predictor": "rsrefseg.inference.predictor",
    "optimize_for_inference": "rsrefseg.modeling.optimize",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rsrefseg' has no attribute {name!r}")
