"""Headless checks of the QGIS plugin, run by QGIS's own Python (not the project's venv).

Usage: ``python3 run_qgis_checks.py CONFIG.json REPORT.json`` (launched by test_qgis_headless.py
with ``QT_QPA_PLATFORM=offscreen``). CONFIG holds the plugin folder, the rsrefseg environment, the
child's PYTHONPATH, checkpoints, the scenes and which checks to run; REPORT receives measurements
(the pytest side asserts on them). The plugin and this script only talk to rsrefseg through its
command line; QGIS's Python never imports rsrefseg or torch (checked at the end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

CONFIG = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
REPORT_PATH = Path(sys.argv[2])
sys.path.insert(0, CONFIG["plugin_dir"])
for extra in ("/usr/share/qgis/python/plugins", "/usr/lib/qgis/python/plugins"):
    if Path(extra).is_dir():
        sys.path.append(extra)

from osgeo import gdal  # noqa: E402
from qgis.core import (  # noqa: E402
    Qgis,
    QgsApplication,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingUtils,
    QgsProject,
    QgsRasterLayer,
    QgsSettings,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication  # noqa: E402

QCoreApplication.setOrganizationName("QGIS")
QCoreApplication.setApplicationName("QGIS3")
APP = QgsApplication([], False, CONFIG["profile"])
APP.initQgis()
from processing.core.Processing import Processing  # noqa: E402

Processing.initialize()

import rsrefseg_qgis  # noqa: E402
from rsrefseg_qgis.clip import clip_to_extent  # noqa: E402

PLUGIN = rsrefseg_qgis.classFactory(None)
PLUGIN.initProcessing()
REGISTRY = QgsApplication.processingRegistry()
QgsSettings().setValue("rsrefseg/environment", CONFIG["environment"])
QgsSettings().setValue("rsrefseg/checkpoint", "")
os.environ["RSREFSEG_PYTHONPATH"] = CONFIG["child_pythonpath"]
WORK = Path(CONFIG["work"])
LOG: list[dict[str, Any]] = []
QgsApplication.messageLog().messageReceived.connect(
    lambda message, tag, level: LOG.append({"message": message, "tag": tag, "critical": level == Qgis.Critical}))


class Feedback(QgsProcessingFeedback):
    """Records what the algorithm reports; optionally cancels at the first progress line of the CLI."""

    def __init__(self, cancel_on_progress: bool = False) -> None:
        super().__init__()
        self.cancel_on_progress = cancel_on_progress
        self.errors: list[str] = []
        self.commands: list[str] = []
        self.texts: list[str] = []
        self.progress: list[float] = []
        self.cancel_time: float | None = None
        self.progressChanged.connect(self.progress.append)

    def reportError(self, error: str, fatalError: bool = False) -> None:
        self.errors.append(error)

    def pushCommandInfo(self, info: str) -> None:
        self.commands.append(info)

    def setProgressText(self, text: str) -> None:
        self.texts.append(text)
        if self.cancel_on_progress and self.cancel_time is None:
            self.cancel_time = time.monotonic()
            self.cancel()


def run(algorithm: str, params: dict[str, Any], feedback: Feedback) -> tuple[dict[str, Any], bool]:
    alg = REGISTRY.createAlgorithmById(algorithm)
    if alg is None:
        raise RuntimeError(f"algorithm {algorithm} is not registered")
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    results, ok = alg.run(params, context, feedback)
    return dict(results or {}), bool(ok)


def cli(args: list[str]) -> subprocess.CompletedProcess:
    """The rsrefseg CLI itself (the reference the plugin's outputs are compared with)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = CONFIG["child_pythonpath"]
    return subprocess.run([CONFIG["environment"], *args], capture_output=True, text=True, env=env)


def vector_stats(layers: list[QgsVectorLayer]) -> dict[str, Any]:
    count, area, area_m2, wkt = 0, 0.0, 0.0, None
    for layer in layers:
        if wkt is None and layer.crs().isValid():
            wkt = layer.crs().toWkt()
        names = layer.fields().names()
        for feature in layer.getFeatures():
            count += 1
            area += feature.geometry().area()
            if "area_m2" in names and feature["area_m2"] not in (None,) and not _is_null(feature["area_m2"]):
                area_m2 += float(feature["area_m2"])
    return {"count": count, "area": area, "area_m2": area_m2, "crs_wkt": wkt}


def _is_null(value: Any) -> bool:
    return value is None or (hasattr(value, "isNull") and value.isNull())


def reference_layers(out: Path, image_index: int) -> tuple[list[QgsVectorLayer], list[str], bool]:
    """The CLI's polygons of image ``image_index`` (its vector file, else its GeoJSON files) and masks."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    record = summary["images"][image_index]
    masks = [str(out / o["mask_tif"]) for o in record["outputs"]]
    if record.get("vector"):
        path = out / record["vector"]
        uri = f"{path}|layername=rsrefseg" if path.suffix == ".gpkg" else str(path)
        return [QgsVectorLayer(uri, "ref", "ogr")], masks, True
    return [QgsVectorLayer(str(out / o["geojson"]), "ref", "ogr") for o in record["outputs"]], masks, False


def same_crs(a: Any, b: Any) -> bool:
    """Same CRS for GDAL/PROJ (names of objects may differ: GeoPackage stores WKT1, which has no name for
    the conversion, so "Albers Equal Area" comes back as "unnamed")."""
    from osgeo import osr

    if not (a.isValid() and b.isValid()):
        return False
    sa, sb = osr.SpatialReference(), osr.SpatialReference()
    wkt2 = a.WKT2_2019 if hasattr(a, "WKT2_2019") else a.WKT_PREFERRED
    sa.ImportFromWkt(a.toWkt(wkt2))
    sb.ImportFromWkt(b.toWkt(wkt2))
    return bool(sa.IsSame(sb))


def masks_equal(mask_path: str, references: list[str]) -> bool:
    dataset = gdal.Open(mask_path)
    if dataset is None or dataset.RasterCount != len(references):
        return False
    for band, ref in enumerate(references, start=1):
        reference = gdal.Open(ref)  # keep the dataset alive while its band is read (GDAL's Python crashes otherwise)
        expected = reference.GetRasterBand(1).ReadAsArray()
        if not (dataset.GetRasterBand(band).ReadAsArray() == expected).all():
            return False
    return True


def compare(name: str, results: dict[str, Any], ok: bool, feedback: Feedback, source_crs: Any,
            ref_out: Path, ref_index: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"ok": ok, "errors": feedback.errors, "commands": feedback.commands,
                             "progress_max": max(feedback.progress, default=None)}
    if not ok:
        return entry
    layer = QgsVectorLayer(results["OUTPUT"], "out", "ogr")
    mask = QgsRasterLayer(results["OUTPUT_MASK"], "mask", "gdal")
    ref_layers, ref_masks, ref_vector = reference_layers(ref_out, ref_index)
    entry.update({
        "vector_valid": layer.isValid(), "mask_valid": mask.isValid(),
        "fields": layer.fields().names(), "feature_count_output": results.get("FEATURE_COUNT"),
        "plugin": vector_stats([layer]), "reference": vector_stats(ref_layers), "reference_is_vector_file": ref_vector,
        "source_crs_wkt": source_crs.toWkt(), "vector_crs_wkt": layer.crs().toWkt(),
        "vector_crs_equal": same_crs(layer.crs(), source_crs), "mask_crs_equal": same_crs(mask.crs(), source_crs),
        "vector_crs_identical": layer.crs() == source_crs, "mask_crs_identical": mask.crs() == source_crs,
        "mask_bands": mask.bandCount(), "mask_band_names": [mask.bandName(i) for i in range(1, mask.bandCount() + 1)],
        "masks_equal_reference": masks_equal(results["OUTPUT_MASK"], ref_masks),
        "expressions": sorted({str(f["expression"]) for f in layer.getFeatures()}),
        "extent_within_source": None,
    })
    return entry


def check_segment(report: dict[str, Any]) -> None:
    scenes = CONFIG["scenes"]
    expressions = CONFIG["expressions"]
    # the inputs of the reference run: each scene, or the clip the plugin makes of it for an extent
    ref_inputs, ref_names = [], []
    for scene in scenes:
        path = scene["path"]
        if scene.get("extent"):
            (WORK / "ref-clips").mkdir(parents=True, exist_ok=True)
            x0, y0, x1, y1 = scene["extent"]
            ref_inputs.append(str(clip_to_extent(path, (x0, y0, x1, y1), WORK / "ref-clips" / f"{Path(path).stem}.vrt")))
        else:
            ref_inputs.append(path)
        ref_names.append(Path(path).name)
    groups: dict[str, list[int]] = {}
    for i, scene in enumerate(scenes):
        groups.setdefault(scene.get("bands", ""), []).append(i)
    ref_of: dict[int, tuple[Path, int]] = {}
    vector_args = ["--vector-format", "gpkg"] if CONFIG["has_vector_format"] else []
    for g, (bands, members) in enumerate(groups.items()):
        out = WORK / f"reference-{g}"
        texts = WORK / "expressions.txt"
        texts.write_text("\n".join(expressions) + "\n", encoding="utf-8")
        done = cli(["predict", *[ref_inputs[i] for i in members], "--texts-file", str(texts),
                    "--checkpoint", CONFIG["checkpoint"], "--out", str(out), "--progress", "none",
                    *(["--bands", bands] if bands else []), *vector_args])
        if done.returncode != 0:
            raise RuntimeError(f"reference CLI run failed: {done.stderr[-2000:]}")
        for k, i in enumerate(members):
            ref_of[i] = (out, k)
    report["segment"] = {}
    for i, scene in enumerate(scenes):
        source = QgsRasterLayer(scene["path"], Path(scene["path"]).stem, "gdal")
        out = WORK / f"plugin-{i}"
        out.mkdir(parents=True, exist_ok=True)
        params: dict[str, Any] = {
            "INPUT": source, "EXPRESSIONS": "\n".join(expressions), "CHECKPOINT": CONFIG["checkpoint"],
            "OUTPUT": str(out / "segments.gpkg"), "OUTPUT_MASK": str(out / "mask.tif"),
        }
        if scene.get("bands"):
            params["BANDS"] = [int(b) for b in scene["bands"].split(",")]
        if scene.get("extent"):
            x0, y0, x1, y1 = scene["extent"]
            params["EXTENT"] = f"{x0!r},{x1!r},{y0!r},{y1!r} [{source.crs().authid()}]"
        feedback = Feedback()
        results, ok = run("rsrefseg:segment", params, feedback)
        entry = compare(ref_names[i], results, ok, feedback, source.crs(), *ref_of[i])
        if ok and scene.get("extent"):
            extent = QgsVectorLayer(results["OUTPUT"], "out", "ogr").extent()
            x0, y0, x1, y1 = scene["extent"]
            entry["extent_within_source"] = (extent.xMinimum() >= x0 - 1e-9 and extent.xMaximum() <= x1 + 1e-9
                                             and extent.yMinimum() >= y0 - 1e-9 and extent.yMaximum() <= y1 + 1e-9)
        report["segment"][ref_names[i]] = entry


def check_cancel(report: dict[str, Any]) -> None:
    scene = CONFIG["scenes"][0]["path"]
    out = WORK / "cancel"
    out.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in Path(QgsProcessingUtils.tempFolder()).glob("rsrefseg-*")}
    feedback = Feedback(cancel_on_progress=True)
    _, ok = run("rsrefseg:segment", {
        "INPUT": scene, "EXPRESSIONS": "the building", "CHECKPOINT": CONFIG["checkpoint"],
        "OUTPUT": str(out / "segments.gpkg"), "OUTPUT_MASK": str(out / "mask.tif")}, feedback)
    returned = time.monotonic()
    left = {p.name for p in Path(QgsProcessingUtils.tempFolder()).glob("rsrefseg-*")} - before
    report["cancel"] = {
        "ok": ok, "cancelled_after_progress": feedback.cancel_time is not None,
        "seconds_to_return": None if feedback.cancel_time is None else returned - feedback.cancel_time,
        "outputs_left": sorted(p.name for p in out.iterdir()), "work_folders_left": sorted(left),
        "processes_left": processes_mentioning(str(Path(QgsProcessingUtils.tempFolder()) / "rsrefseg-")),
        "errors": feedback.errors,
    }


def processes_mentioning(*parts: str) -> list[str]:
    """Command lines of live processes that contain every one of ``parts`` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if all(p in text for p in parts) and "run_qgis_checks" not in text:
            found.append(text.strip())
    return found


def check_bad_checkpoint(report: dict[str, Any]) -> None:
    bad = CONFIG["bad_checkpoint"]
    scene = CONFIG["scenes"][0]["path"]
    out = WORK / "bad-plugin"
    out.mkdir(parents=True, exist_ok=True)
    feedback = Feedback()
    log_start = len(LOG)
    _, ok = run("rsrefseg:segment", {
        "INPUT": scene, "EXPRESSIONS": "the building", "CHECKPOINT": bad,
        "OUTPUT": str(out / "segments.gpkg"), "OUTPUT_MASK": str(out / "mask.tif")}, feedback)
    QCoreApplication.processEvents()
    report["bad_checkpoint"] = {
        "expected_error": CONFIG["expected_bad_checkpoint_error"], "ok": ok, "plugin_errors": feedback.errors,
        "log": [m for m in LOG[log_start:] if m["tag"] == "RSRefSeg"],
        "outputs_left": sorted(p.name for p in out.iterdir()),
    }


def check_features(report: dict[str, Any]) -> None:
    scene = CONFIG["scenes"][0]["path"]
    expressions = CONFIG["expressions"]
    folder = WORK / "features"
    feedback = Feedback()
    results, ok = run("rsrefseg:encode", {"INPUT": scene, "CHECKPOINT": CONFIG["checkpoint"],
                                          "OUTPUT": str(folder)}, feedback)
    entry: dict[str, Any] = {"encode_ok": ok, "encode_errors": feedback.errors, "features": results.get("FEATURES")}
    if ok:
        texts = WORK / "expressions.txt"
        ref = WORK / "reference-features"
        done = cli(["predict", "--features", results["FEATURES"], "--texts-file", str(texts),
                    "--checkpoint", CONFIG["checkpoint"], "--out", str(ref), "--progress", "none",
                    *(["--vector-format", "gpkg"] if CONFIG["has_vector_format"] else [])])
        entry["reference_returncode"], entry["reference_stderr"] = done.returncode, done.stderr[-2000:]
        out = WORK / "plugin-features"
        out.mkdir(parents=True, exist_ok=True)
        feedback = Feedback()
        seg, seg_ok = run("rsrefseg:segment_features", {
            "FEATURES": results["FEATURES"], "EXPRESSIONS": "\n".join(expressions),
            "CHECKPOINT": CONFIG["checkpoint"], "OUTPUT": str(out / "segments.gpkg"),
            "OUTPUT_MASK": str(out / "mask.tif")}, feedback)
        source = QgsRasterLayer(scene, "source", "gdal")
        entry["segment"] = compare("features", seg, seg_ok, feedback, source.crs(), ref, 0) \
            if done.returncode == 0 else {"ok": seg_ok, "errors": feedback.errors}
    report["features"] = entry


def check_vector_layout(report: dict[str, Any]) -> None:
    """The plugin reads the combined vector file of CONTRACTS.md A (``images[i]["vector"]``, layer
    ``rsrefseg``; built here with OGR from the reference run's GeoJSON files) exactly as the
    per-expression GeoJSON files: same features, attributes, areas and CRS."""
    from osgeo import ogr
    from rsrefseg_qgis.layers import cli_features
    from rsrefseg_qgis.results import image_outputs

    ref = WORK / "reference-0"
    summary = json.loads((ref / "summary.json").read_text(encoding="utf-8"))
    record = {k: v for k, v in summary["images"][0].items() if k not in ("vector", "vector_format")}
    old = image_outputs({**summary, "images": [record]}, ref)
    path = ref / record["dir"] / f"{record['dir']}.contract.gpkg"
    first = ogr.Open(str(old.expressions[0].geojson))
    dataset = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = dataset.CreateLayer("rsrefseg", first.GetLayer(0).GetSpatialRef(), ogr.wkbMultiPolygon)
    for name, kind in (("expr_index", ogr.OFTInteger), ("expression", ogr.OFTString), ("score", ogr.OFTReal),
                       ("area_m2", ogr.OFTReal), ("perimeter_m", ogr.OFTReal), ("source", ogr.OFTString)):
        layer.CreateField(ogr.FieldDefn(name, kind))
    for expr in old.expressions:
        source = ogr.Open(str(expr.geojson))
        for feature in source.GetLayer(0):
            out = ogr.Feature(layer.GetLayerDefn())
            geometry = feature.GetGeometryRef()
            out.SetGeometry(ogr.ForceToMultiPolygon(geometry.Clone()))
            out["expr_index"], out["expression"] = expr.index, expr.expression
            out["score"], out["source"] = feature["score"], feature["source"]
            if feature["area_m2"] is not None:
                out["area_m2"] = feature["area_m2"]
                out["perimeter_m"] = geometry.Boundary().Length()  # metres: the Albers CRS is in metres
            layer.CreateFeature(out)
        source = None
    first = dataset = layer = None  # close (GDAL writes on release)
    new = image_outputs({**summary, "images": [{**record, "vector": str(path.relative_to(ref)),
                                                "vector_format": "gpkg"}]}, ref)

    def rows(features: list[Any]) -> list[tuple]:
        return sorted((int(f["expr_index"]), str(f["expression"]), round(float(f["score"]), 9),
                       round(f.geometry().area(), 6), round(float(f["area_m2"]), 6), round(float(f["perimeter_m"]), 6),
                       str(f["source"])) for f in features)

    old_features, old_layer = cli_features(old)
    new_features, new_layer = cli_features(new)
    report["vector_layout"] = {
        "from_vector_file": new.vector is not None, "count_geojson": len(old_features),
        "count_vector_file": len(new_features), "rows_equal": rows(old_features) == rows(new_features),
        "crs_equal": same_crs(old_layer.crs(), new_layer.crs()),
    }


def check_bad_inputs(report: dict[str, Any]) -> None:
    """Mistakes caught before rsrefseg starts: each run fails with one readable message, no output."""
    scene = CONFIG["scenes"][0]["path"]
    out = WORK / "bad-inputs"
    out.mkdir(parents=True, exist_ok=True)
    base = {"INPUT": scene, "EXPRESSIONS": "the building", "CHECKPOINT": CONFIG["checkpoint"],
            "OUTPUT": str(out / "segments.gpkg"), "OUTPUT_MASK": str(out / "mask.tif")}
    source = QgsRasterLayer(scene, "s", "gdal")
    e = source.extent()
    far = f"{e.xMaximum() + 1000},{e.xMaximum() + 2000},{e.yMaximum() + 1000},{e.yMaximum() + 2000}"
    cases = {
        "no_expression": ("rsrefseg:segment", {**base, "EXPRESSIONS": " \n  \n"}),
        "two_bands": ("rsrefseg:segment", {**base, "BANDS": [1, 2]}),
        "extent_outside": ("rsrefseg:segment", {**base, "EXTENT": far}),
        "no_checkpoint": ("rsrefseg:segment", {**base, "CHECKPOINT": ""}),
        "not_a_feature_folder": ("rsrefseg:segment_features", {**base, "FEATURES": str(out)}),
        "missing_environment": ("rsrefseg:segment", base),
    }
    results: dict[str, Any] = {}
    for name, (algorithm, params) in cases.items():
        if name == "missing_environment":
            QgsSettings().setValue("rsrefseg/environment", str(WORK / "no-such-env"))
        feedback = Feedback()
        try:
            _, ok = run(algorithm, params, feedback)
        finally:
            QgsSettings().setValue("rsrefseg/environment", CONFIG["environment"])
        results[name] = {"ok": ok, "errors": feedback.errors, "commands": feedback.commands}
    results["outputs_left"] = sorted(p.name for p in out.iterdir())
    report["bad_inputs"] = results


def main() -> None:
    report: dict[str, Any] = {"qgis_version": Qgis.QGIS_VERSION}
    algorithms = sorted(a.id() for a in REGISTRY.providerById("rsrefseg").algorithms())
    report["algorithms"] = algorithms
    checks = {"segment": check_segment, "cancel": check_cancel, "bad_checkpoint": check_bad_checkpoint,
              "features": check_features, "vector_layout": check_vector_layout,
              "bad_inputs": check_bad_inputs}
    for name in CONFIG["checks"]:
        start = time.monotonic()
        try:
            checks[name](report)
        except Exception:
            report.setdefault("exceptions", {})[name] = traceback.format_exc()
        report.setdefault("seconds", {})[name] = round(time.monotonic() - start, 1)
    heavy = sorted(m for m in ("rsrefseg", "torch", "transformers", "rasterio") if m in sys.modules)
    report["heavy_modules_in_qgis"] = heavy
    REPORT_PATH.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")


main()
# End here: the tracebacks of the failed runs keep frames (and the layers in them) alive until
# interpreter shutdown, which would destroy them after exitQgis() has closed GDAL (a crash that says
# nothing about the plugin). The report is written and closed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
