"""Turn a finished ``rsrefseg predict`` run into the algorithm's outputs (shared by both segmenters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterString,
    QgsWkbTypes,
)

from ..layers import (
    cli_features,
    layer_name,
    mask_styler,
    output_crs,
    output_fields,
    vector_styler,
    write_features,
)
from ..layers import write_mask_raster as stack_masks
from ..results import check_georeferenced, image_outputs, read_summary
from .base import RSRefSegAlgorithm, parse_expressions, tr

EXPRESSIONS, THRESHOLD = "EXPRESSIONS", "THRESHOLD"
OUTPUT, OUTPUT_MASK, FEATURE_COUNT = "OUTPUT", "OUTPUT_MASK", "FEATURE_COUNT"


def add_expression_parameters(alg: RSRefSegAlgorithm) -> None:
    """EXPRESSIONS (multi-line) and THRESHOLD."""
    alg.addParameter(QgsProcessingParameterString(
        EXPRESSIONS, tr("Referring expressions, one per line (e.g. \"the storage tank closest to the river\")"),
        multiLine=True))
    alg.addParameter(QgsProcessingParameterNumber(
        THRESHOLD, tr("Mask threshold (logit; 0 = probability 0.5, lower = larger masks)"),
        type=QgsProcessingParameterNumber.Double, defaultValue=0.0))


def add_output_parameters(alg: RSRefSegAlgorithm) -> None:
    """OUTPUT (polygons, GeoPackage by default), OUTPUT_MASK (raster, one band per expression)."""
    alg.addParameter(QgsProcessingParameterFeatureSink(
        OUTPUT, tr("Segments (polygons, one feature per connected region)"), QgsProcessing.TypeVectorPolygon))
    alg.addParameter(QgsProcessingParameterRasterDestination(
        OUTPUT_MASK, tr("Mask raster (one band per expression, 255 = the referred object)"),
        optional=True, createByDefault=True))
    alg.addOutput(QgsProcessingOutputNumber(FEATURE_COUNT, tr("Number of polygons")))


def expressions_file(alg: RSRefSegAlgorithm, parameters: dict[str, Any], context: Any, work: Path) -> Path:
    """The expressions written one per line into ``work/expressions.txt`` (the CLI's ``--texts-file``)."""
    expressions = parse_expressions(alg.parameterAsString(parameters, EXPRESSIONS, context))
    if not expressions:
        raise QgsProcessingException(tr("No expression: type at least one referring expression (one per line)"))
    path = work / "expressions.txt"
    path.write_text("\n".join(expressions) + "\n", encoding="utf-8")
    return path


def threshold_args(alg: RSRefSegAlgorithm, parameters: dict[str, Any], context: Any) -> list[str]:
    """``--threshold=T`` (the ``=`` form lets negative values through argparse)."""
    return [f"--threshold={alg.parameterAsDouble(parameters, THRESHOLD, context)!r}"]


def vector_args(alg: RSRefSegAlgorithm) -> list[str]:
    """``--vector-format gpkg`` when the CLI has it (one GeoPackage per image), else nothing."""
    return ["--vector-format", "gpkg"] if alg.supports("predict", "--vector-format") else []


def deliver(alg: RSRefSegAlgorithm, parameters: dict[str, Any], context: Any, feedback: Any, out: Path,
            work: Path, crs: QgsCoordinateReferenceSystem | None = None,
            source: str | None = None) -> dict[str, Any]:
    """Read ``out/summary.json``, write the mask raster and the sink, name and style them.

    ``crs``: the source raster's CRS (preferred over the CLI file's); ``source``: the value of the
    ``source`` field (the user's raster when the CLI read a clipped copy).
    """
    summary = read_summary(out)
    outputs = image_outputs(summary, out)
    check_georeferenced(outputs)
    expressions = [e.expression for e in outputs.expressions] or list(summary.get("expressions", []))
    feedback.setProgressText(tr("Writing the outputs"))
    features, cli_layer = cli_features(outputs, source)
    target_crs = output_crs(outputs, cli_layer, crs)
    results: dict[str, Any] = {FEATURE_COUNT: len(features)}
    mask_path = alg.parameterAsOutputLayer(parameters, OUTPUT_MASK, context)
    if mask_path:  # first: it is the output more likely to fail (disk, driver), and it is written atomically
        stack_masks(outputs, mask_path, work)
        results[OUTPUT_MASK] = mask_path
        if context.willLoadLayerOnCompletion(mask_path):
            details = context.layerToLoadOnCompletionDetails(mask_path)
            details.name = layer_name(expressions[:1], "mask: ")  # band 1; further bands get their own layers
            details.setPostProcessor(mask_styler(expressions))
    sink, dest_id = alg.parameterAsSink(parameters, OUTPUT, context, output_fields(), QgsWkbTypes.MultiPolygon,
                                        target_crs)
    if sink is None:
        raise QgsProcessingException(alg.invalidSinkError(parameters, OUTPUT))
    write_features(sink, features)
    del sink  # flush and close before Processing loads the layer
    results[OUTPUT] = dest_id
    if context.willLoadLayerOnCompletion(dest_id):
        details = context.layerToLoadOnCompletionDetails(dest_id)
        details.name = layer_name(expressions)
        details.setPostProcessor(vector_styler(expressions))
    feedback.pushInfo(tr(f"{len(features)} polygon(s) for {len(expressions)} expression(s)"))
    return results
