"""QGIS side of the outputs: copy the CLI's polygons into a Processing sink, stack the masks into one
raster, and give the loaded layers a readable style."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from osgeo import gdal
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsFillSymbol,
    QgsPalettedRasterRenderer,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

from .results import VECTOR_LAYER, ImageOutputs

#: Colours of expression 1, 2, ... (vector categories and mask bands), distinct on imagery.
PALETTE = ((255, 45, 45), (0, 200, 255), (255, 220, 0), (80, 230, 80), (255, 120, 0), (200, 80, 255),
           (255, 80, 200), (0, 255, 180))
#: Fill alpha (0-255) of the polygons and of the mask pixels.
FILL_ALPHA, MASK_ALPHA = 70, 150


class OutputError(Exception):
    """The CLI's output files cannot be read or the plugin's outputs cannot be written."""


def output_fields() -> QgsFields:
    """Fields of the plugin's vector output (those of the CLI's ``rsrefseg`` layer)."""
    fields = QgsFields()
    for name, kind in (("expr_index", QVariant.Int), ("expression", QVariant.String), ("score", QVariant.Double),
                       ("area_m2", QVariant.Double), ("perimeter_m", QVariant.Double),
                       ("source", QVariant.String)):
        fields.append(QgsField(name, kind))
    return fields


def colour(index: int) -> tuple[int, int, int]:
    """The colour of expression ``index`` (1-based)."""
    return PALETTE[(index - 1) % len(PALETTE)]


def _open_vector(path: Path) -> QgsVectorLayer:
    uri = str(path)
    if path.suffix.lower() == ".gpkg":
        uri += f"|layername={VECTOR_LAYER}"
    layer = QgsVectorLayer(uri, path.stem, "ogr")
    if not layer.isValid():
        raise OutputError(f"{path}: QGIS cannot open the vector output of rsrefseg")
    return layer


def _number(value: Any) -> float | None:
    if value is None or (hasattr(value, "isNull") and value.isNull()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def cli_features(outputs: ImageOutputs, source: str | None = None) -> tuple[list[QgsFeature], QgsVectorLayer | None]:
    """The CLI's polygons as features with :func:`output_fields` (geometries as written, multi-part).

    Reads ``outputs.vector`` when the CLI wrote one, else the per-expression GeoJSON files.
    ``source`` replaces the ``source`` field (the user's raster instead of a clipped VRT).
    Returns the features and one opened CLI layer (for its CRS; None when there is no file).
    """
    fields = output_fields()
    features: list[QgsFeature] = []
    first: QgsVectorLayer | None = None

    def add(geometry: Any, values: dict[str, Any]) -> None:
        if geometry is None or geometry.isEmpty():
            return
        geometry.convertToMultiType()
        feature = QgsFeature(fields)
        feature.setGeometry(geometry)
        for name in fields.names():
            feature[name] = values.get(name)
        features.append(feature)

    if outputs.vector is not None:
        layer = first = _open_vector(outputs.vector)
        names = layer.fields().names()
        for f in layer.getFeatures():
            values = {n: f[n] for n in names if n in fields.names()}
            for n in ("score", "area_m2", "perimeter_m"):
                values[n] = _number(values.get(n))
            if source:
                values["source"] = source
            add(f.geometry(), values)
        return features, first
    for expr in outputs.expressions:
        if expr.geojson is None:
            continue
        layer = _open_vector(expr.geojson)
        first = first or layer
        for f in layer.getFeatures():
            names = f.fields().names()
            area_m2 = _number(f["area_m2"]) if "area_m2" in names else None
            area_crs = _number(f["area_crs_units"]) if "area_crs_units" in names else None
            geometry = f.geometry()
            # metres per CRS unit from the two areas of the CLI (None when the CRS has no linear unit)
            scale = math.sqrt(area_m2 / area_crs) if area_m2 is not None and area_crs else None
            score = _number(f["score"]) if "score" in names else None
            add(geometry, {
                "expr_index": expr.index, "expression": expr.expression,
                "score": score if score is not None else expr.score, "area_m2": area_m2,
                "perimeter_m": geometry.length() * scale if scale is not None else None,
                "source": source or (f["source"] if "source" in names else outputs.source),
            })
    return features, first


def output_crs(outputs: ImageOutputs, layer: QgsVectorLayer | None,
               fallback: QgsCoordinateReferenceSystem | None = None) -> QgsCoordinateReferenceSystem:
    """CRS of the outputs: ``fallback`` (the source raster's) when valid, else the CLI layer's, else
    the summary's CRS string."""
    if fallback is not None and fallback.isValid():
        return fallback
    if layer is not None and layer.crs().isValid():
        return layer.crs()
    crs = QgsCoordinateReferenceSystem()
    if outputs.crs:
        crs = QgsCoordinateReferenceSystem.fromWkt(outputs.crs)
        if not crs.isValid():
            crs = QgsCoordinateReferenceSystem(outputs.crs)
    return crs


def write_features(sink: Any, features: list[QgsFeature]) -> None:
    """Add ``features`` to a Processing sink."""
    for feature in features:
        if not sink.addFeature(feature, QgsFeatureSink.FastInsert):
            raise OutputError(f"cannot write a feature to the output: {sink.lastError()}")


def write_mask_raster(outputs: ImageOutputs, dest: str, work: Path) -> int:
    """Stack band 1 of each expression's mask GeoTIFF into ``dest`` (one band per expression, band
    description = the expression), written under a temporary name then renamed. Returns the band count.
    """
    masks = [(e.expression, e.mask_tif) for e in outputs.expressions if e.mask_tif is not None]
    if not masks:
        raise OutputError(f"{outputs.source}: rsrefseg wrote no mask GeoTIFF")
    singles = []
    for i, (_, path) in enumerate(masks, start=1):
        single = work / f"mask-band-{i}.vrt"
        if gdal.Translate(str(single), str(path), format="VRT", bandList=[1]) is None:
            raise OutputError(f"{path}: cannot read the mask ({gdal.GetLastErrorMsg()})")
        singles.append(str(single))
    stack_path = work / "mask-stack.vrt"
    stack = gdal.BuildVRT(str(stack_path), singles, separate=True)
    if stack is None:
        raise OutputError(f"cannot stack the masks ({gdal.GetLastErrorMsg()})")
    for i, (expression, _) in enumerate(masks, start=1):
        stack.GetRasterBand(i).SetDescription(expression)
    stack = None  # flush the VRT
    target = Path(dest)
    driver = QgsRasterFileWriter.driverForExtension(target.suffix) or "GTiff"
    options = ["COMPRESS=DEFLATE", "TILED=YES"] if driver == "GTiff" else []
    part = target.with_name(f".{target.stem}.part{target.suffix}")
    written = gdal.Translate(str(part), str(stack_path), format=driver, creationOptions=options)
    if written is None:
        raise OutputError(f"{target}: cannot write the mask raster ({gdal.GetLastErrorMsg()})")
    written = None  # close before renaming (band descriptions came with the VRT)
    os.replace(part, target)
    return len(masks)


def style_vector(layer: QgsVectorLayer, expressions: list[str]) -> None:
    """Categories by ``expr_index``: per expression a coloured outline and a translucent fill."""
    categories = []
    for index, expression in enumerate(expressions, start=1):
        r, g, b = colour(index)
        symbol = QgsFillSymbol.createSimple({
            "color": f"{r},{g},{b},{FILL_ALPHA}", "outline_color": f"{r},{g},{b},255",
            "outline_width": "0.5", "outline_width_unit": "MM", "joinstyle": "miter",
        })
        categories.append(QgsRendererCategory(index, symbol, f"{index}. {expression}"))
    layer.setRenderer(QgsCategorizedSymbolRenderer("expr_index", categories))
    layer.triggerRepaint()


def style_mask(layer: QgsRasterLayer, band: int, index: int, label: str) -> None:
    """Band ``band`` of a 0/255 mask: 255 in the expression's colour, everything else transparent."""
    r, g, b = colour(index)
    classes = [QgsPalettedRasterRenderer.Class(255, QColor(r, g, b, MASK_ALPHA), label)]
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), band, classes))
    layer.triggerRepaint()


class LayerStyler(QgsProcessingLayerPostProcessorInterface):
    """Applies a style function to a layer loaded at the end of an algorithm (main thread)."""

    #: References kept alive until QGIS has used them (post-processors are not owned by QGIS).
    _alive: ClassVar[list[LayerStyler]] = []

    def __init__(self, apply: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self.apply = apply

    def postProcessLayer(self, layer: Any, context: Any, feedback: Any) -> None:
        self.apply(layer, context)

    @classmethod
    def create(cls, apply: Callable[[Any, Any], None]) -> LayerStyler:
        """A styler kept alive (the last 64 are kept)."""
        styler = cls(apply)
        cls._alive = [*cls._alive[-63:], styler]
        return styler


def mask_styler(expressions: list[str]) -> LayerStyler:
    """Styles band 1 of the mask layer; with several expressions, adds one layer per further band."""

    def apply(layer: Any, context: Any) -> None:
        if not isinstance(layer, QgsRasterLayer):
            return
        style_mask(layer, 1, 1, expressions[0] if expressions else "mask")
        project = context.project() if context is not None else None
        if project is None:
            return
        for band in range(2, min(layer.bandCount(), len(expressions)) + 1):
            extra = QgsRasterLayer(layer.source(), f"mask: {expressions[band - 1]}", "gdal")
            if extra.isValid():
                style_mask(extra, band, band, expressions[band - 1])
                project.addMapLayer(extra)

    return LayerStyler.create(apply)


def vector_styler(expressions: list[str]) -> LayerStyler:
    """Styles the polygon layer with :func:`style_vector`."""

    def apply(layer: Any, context: Any) -> None:
        if isinstance(layer, QgsVectorLayer):
            style_vector(layer, expressions)

    return LayerStyler.create(apply)


def layer_name(expressions: list[str], prefix: str = "", max_length: int = 90) -> str:
    """``prefix`` + the expressions joined by ``; ``, shortened with an ellipsis."""
    text = prefix + "; ".join(expressions)
    return text if len(text) <= max_length else text[: max_length - 1].rstrip() + "…"
