"""Processing algorithms "Encode scene features" (``rsrefseg encode``) and "Segment from features"
(``rsrefseg predict --features``): encode a large scene once, then every new query only decodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputFolder,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterRasterLayer,
)

from ..runner import RSRefSegNotFound
from .base import RSRefSegAlgorithm, raster_file, tr
from .deliver import (
    add_expression_parameters,
    add_output_parameters,
    deliver,
    expressions_file,
    threshold_args,
)
from .deliver import vector_args as vector_format_args
from .segment import band_args

#: Feature dtypes of ``rsrefseg encode --dtype``.
DTYPES = ("float32", "float16")
#: The file that marks a feature folder.
INDEX = "index.json"


def feature_folder(path: str) -> Path:
    """``path`` when it holds ``index.json``, else its only sub-folder holding one.

    Raises:
        QgsProcessingException: no feature folder there.
    """
    folder = Path(path)
    if (folder / INDEX).is_file():
        return folder
    inside = sorted(p.parent for p in folder.glob(f"*/{INDEX}")) if folder.is_dir() else []
    if len(inside) == 1:
        return inside[0]
    if len(inside) > 1:
        raise QgsProcessingException(tr(f"{folder}: holds the features of {len(inside)} scenes; choose one of "
                                        f"its sub-folders ({', '.join(p.name for p in inside[:5])})"))
    raise QgsProcessingException(tr(f"{folder}: not a feature folder (no {INDEX}); make one with "
                                    "\"Encode scene features\""))


class EncodeFeatures(RSRefSegAlgorithm):
    """rsrefseg encode on a raster layer."""

    INPUT, BANDS, DTYPE, OUTPUT, FEATURES = "INPUT", "BANDS", "DTYPE", "OUTPUT", "FEATURES"

    def name(self) -> str:
        return "encode"

    def displayName(self) -> str:
        return tr("Encode scene features")

    def shortHelpString(self) -> str:
        return tr(
            "Encodes a raster once into a feature folder (rsrefseg encode): the image embeddings of every "
            "window, on disk. \"Segment from features\" then answers new expressions on that scene by "
            "decoding only, in seconds, across QGIS sessions. The folder is tied to the checkpoint, the "
            "bands and the tiling used here. An interrupted run resumes when started again with the same "
            "output folder."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Raster layer or file")))
        self.add_checkpoint_parameter()
        self.add_bands_parameter(self.BANDS, self.INPUT)
        self.addParameter(QgsProcessingParameterEnum(
            self.DTYPE, tr("Feature precision on disk (float16: half the size)"), options=list(DTYPES),
            defaultValue=0))
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT, tr("Feature folder")))
        self.addOutput(QgsProcessingOutputFolder(self.FEATURES, tr("Features of the scene")))
        self.add_model_parameters()

    def process(self, parameters: dict[str, Any], context: Any, feedback: Any, work: Path) -> dict[str, Any]:
        if not self.supports("encode", "--out"):
            raise RSRefSegNotFound("this rsrefseg has no encode command; update rsrefseg")
        layer = self.valid_raster_layer(parameters, self.INPUT, context)
        out = Path(self.parameterAsString(parameters, self.OUTPUT, context))
        out.mkdir(parents=True, exist_ok=True)
        path, _ = raster_file(layer, out)  # a VRT of a non-file source stays next to its features
        args = band_args(self, parameters, context, self.BANDS)
        dtype = DTYPES[self.parameterAsEnum(parameters, self.DTYPE, context)]
        result = self.run_rsrefseg(
            ["encode", path, "--out", str(out), "--checkpoint", self.checkpoint(parameters, context),
             "--dtype", dtype, *args, *self.model_args(parameters, context), "--progress", "json"],
            feedback)
        folders = [Path(s["folder"]) for e in result.events if e.get("event") == "done"
                   for s in e.get("scenes", []) if s.get("folder")]
        folder = folders[0] if folders else feature_folder(str(out))
        feedback.pushInfo(tr(f"Features written to {folder}"))
        return {self.OUTPUT: str(out), self.FEATURES: str(folder)}


class SegmentFromFeatures(RSRefSegAlgorithm):
    """rsrefseg predict --features: decode new expressions from a feature folder."""

    FEATURES = "FEATURES"

    def name(self) -> str:
        return "segment_features"

    def displayName(self) -> str:
        return tr("Segment from features")

    def shortHelpString(self) -> str:
        return tr(
            "Segments referring expressions on a scene encoded by \"Encode scene features\", without reading "
            "or encoding the image again (seconds instead of minutes on a large scene). Use the checkpoint "
            "the features were made with. Outputs as in \"Segment by expression\"."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterFile(
            self.FEATURES, tr("Feature folder (from \"Encode scene features\")"),
            behavior=QgsProcessingParameterFile.Folder))
        add_expression_parameters(self)
        self.add_checkpoint_parameter()
        add_output_parameters(self)
        self.add_model_parameters()

    def process(self, parameters: dict[str, Any], context: Any, feedback: Any, work: Path) -> dict[str, Any]:
        folder = feature_folder(self.parameterAsFile(parameters, self.FEATURES, context))
        texts = expressions_file(self, parameters, context, work)
        if not self.supports("predict", "--features"):
            raise RSRefSegNotFound("this rsrefseg has no predict --features; update rsrefseg")
        out = work / "out"
        self.run_rsrefseg(
            ["predict", "--features", str(folder), "--texts-file", str(texts),
             "--checkpoint", self.checkpoint(parameters, context), "--out", str(out),
             *threshold_args(self, parameters, context), *vector_format_args(self),
             *self.model_args(parameters, context), "--progress", "json"],
            feedback)
        source = None
        try:
            source = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("scene", {}).get("path")
        except (OSError, ValueError, AttributeError):
            pass
        return deliver(self, parameters, context, feedback, out, work,
                       source=str(source) if isinstance(source, str) else None)
