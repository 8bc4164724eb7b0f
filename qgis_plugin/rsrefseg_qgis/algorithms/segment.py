"""Processing algorithm "Segment by expression": a raster layer + expressions -> polygons and masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingParameterExtent,
    QgsProcessingParameterRasterLayer,
)

from ..clip import clip_to_extent
from .base import RSRefSegAlgorithm, raster_file, tr
from .deliver import (
    add_expression_parameters,
    add_output_parameters,
    deliver,
    expressions_file,
    threshold_args,
    vector_args,
)


def band_args(alg: RSRefSegAlgorithm, parameters: dict[str, Any], context: Any, name: str) -> list[str]:
    """``--bands R,G,B`` from a multiple band parameter (1 or 3 bands), nothing when empty."""
    bands = [int(b) for b in alg.parameterAsInts(parameters, name, context) if int(b) > 0]
    if not bands:
        return []
    if len(bands) not in (1, 3):
        raise QgsProcessingException(tr(f"Choose 1 or 3 bands (red, green, blue), not {len(bands)}"))
    return ["--bands", ",".join(str(b) for b in bands)]


class SegmentByExpression(RSRefSegAlgorithm):
    """rsrefseg predict on a raster layer (optionally clipped to an extent)."""

    INPUT, BANDS, EXTENT = "INPUT", "BANDS", "EXTENT"

    def name(self) -> str:
        return "segment"

    def displayName(self) -> str:
        return tr("Segment by expression")

    def shortHelpString(self) -> str:
        return tr(
            "Finds the objects that referring expressions describe (\"the storage tank closest to the river\") "
            "in a raster layer, with the rsrefseg command of the environment set in Raster > RSRefSeg > "
            "Settings. One expression per line. Output: polygons in the raster's CRS with the fields "
            "expr_index, expression, score, area_m2, perimeter_m and source, and a mask raster with one band "
            "per expression (255 = object). An extent (the map view, or a rectangle drawn on the map) "
            "segments only that part of the raster. Bands: 1 or 3 bands shown as red, green, blue (default: "
            "the first three, or the single band)."
        )

    def initAlgorithm(self, config: Any = None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Raster layer or file")))
        add_expression_parameters(self)
        self.add_checkpoint_parameter()
        self.add_bands_parameter(self.BANDS, self.INPUT)
        self.addParameter(QgsProcessingParameterExtent(
            self.EXTENT, tr("Only this extent (map view or drawn rectangle; empty: the whole raster)"),
            optional=True))
        add_output_parameters(self)
        self.add_model_parameters()

    def process(self, parameters: dict[str, Any], context: Any, feedback: Any, work: Path) -> dict[str, Any]:
        layer = self.valid_raster_layer(parameters, self.INPUT, context)
        path, original = raster_file(layer, work)
        texts = expressions_file(self, parameters, context, work)
        args = band_args(self, parameters, context, self.BANDS)
        checkpoint = self.checkpoint(parameters, context)
        source = path
        if parameters.get(self.EXTENT) not in (None, ""):
            rect = self.parameterAsExtent(parameters, self.EXTENT, context, layer.crs())
            if not rect.isNull() and not rect.isEmpty():
                stem = Path(path).stem if original else "source"
                source = str(clip_to_extent(path, (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(),
                                                   rect.yMaximum()), work / f"{stem}.vrt"))
                feedback.pushInfo(tr(f"Clipped to {rect.toString(3)} ({layer.crs().authid() or 'source CRS'})"))
        out = work / "out"
        self.run_rsrefseg(
            ["predict", source, "--texts-file", str(texts), "--checkpoint", checkpoint, "--out", str(out),
             *args, *threshold_args(self, parameters, context), *vector_args(self),
             *self.model_args(parameters, context), "--progress", "json"],
            feedback)
        return deliver(self, parameters, context, feedback, out, work, crs=layer.crs(),
                       source=path if original else layer.source())
