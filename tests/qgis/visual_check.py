"""Run inside the QGIS desktop (``qgis --code visual_check.py``, under Xvfb) by test_qgis_visual.py.

With the plugin installed from its zip in a fresh profile: load a GeoTIFF, run "Segment by
expression" through Processing (results loaded and styled as in the GUI), then save screenshots (map
canvas, main window, the algorithm's dialog, the settings dialog) and a JSON report, and quit.
Configuration: the JSON file named by ``$RSREFSEG_VISUAL_CONFIG``.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from pathlib import Path
from typing import Any

import processing
from qgis.core import QgsProcessingException, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import QTimer
from qgis.utils import iface, plugins

CONFIG = json.loads(Path(os.environ["RSREFSEG_VISUAL_CONFIG"]).read_text(encoding="utf-8"))
SHOTS = Path(CONFIG["artifacts"])
REPORT: dict[str, Any] = {"plugins": sorted(plugins), "steps": []}


def same_crs(a: Any, b: Any) -> bool:
    """Same CRS for PROJ (GeoPackage's WKT1 renames the Albers conversion "unnamed"; see run_qgis_checks.py)."""
    from osgeo import osr

    sa, sb = osr.SpatialReference(), osr.SpatialReference()
    sa.ImportFromWkt(a.toWkt(a.WKT_PREFERRED))
    sb.ImportFromWkt(b.toWkt(b.WKT_PREFERRED))
    return a.isValid() and b.isValid() and bool(sa.IsSame(sb))


def save_report() -> None:
    Path(CONFIG["report"]).write_text(json.dumps(REPORT, indent=1, default=str), encoding="utf-8")


def guarded(step: Any) -> Any:
    def run() -> None:
        try:
            step()
            REPORT["steps"].append(step.__name__)
        except Exception:
            REPORT["error"] = traceback.format_exc()
            quit_qgis()
        save_report()

    return run


@guarded
def segment() -> None:
    raster = iface.addRasterLayer(CONFIG["scene"], Path(CONFIG["scene"]).stem)
    REPORT["raster_valid"] = bool(raster and raster.isValid())
    result = processing.runAndLoadResults("rsrefseg:segment", {
        "INPUT": raster, "EXPRESSIONS": "\n".join(CONFIG["expressions"]), "CHECKPOINT": CONFIG["checkpoint"],
        "OUTPUT": CONFIG["vector"], "OUTPUT_MASK": CONFIG["mask"],
    })
    REPORT["result"] = {k: str(v) for k, v in result.items()}
    layers = []
    for layer in QgsProject.instance().mapLayers().values():
        info: dict[str, Any] = {"name": layer.name(), "crs_equal_raster": same_crs(layer.crs(), raster.crs()),
                                "renderer": layer.renderer().type() if layer.renderer() else None}
        if isinstance(layer, QgsVectorLayer):
            info["features"] = layer.featureCount()
            info["categories"] = [c.label() for c in layer.renderer().categories()] \
                if hasattr(layer.renderer(), "categories") else []
        if isinstance(layer, QgsRasterLayer):
            info["band"] = getattr(layer.renderer(), "band", lambda: None)()
        layers.append(info)
    REPORT["layers"] = layers
    canvas = iface.mapCanvas()
    canvas.setExtent(raster.extent())
    canvas.refresh()
    QTimer.singleShot(1500, guarded(screenshots))


@guarded
def screenshots() -> None:
    canvas = iface.mapCanvas()
    canvas.waitWhileRendering()
    canvas.saveAsImage(str(SHOTS / "qgis_canvas.png"))
    iface.mainWindow().grab().save(str(SHOTS / "qgis_window.png"))
    raster = QgsProject.instance().mapLayersByName(Path(CONFIG["scene"]).stem)[0]
    dialog = processing.createAlgorithmDialog("rsrefseg:segment", {
        "INPUT": raster.id(), "EXPRESSIONS": "\n".join(CONFIG["expressions"]), "CHECKPOINT": CONFIG["checkpoint"]})
    dialog.resize(1100, 820)
    dialog.show()
    REPORT["dialog"] = dialog.windowTitle()
    QTimer.singleShot(1000, guarded(lambda: grab_dialogs(dialog)))


def grab_dialogs(dialog: Any) -> None:
    dialog.grab().save(str(SHOTS / "qgis_algorithm_dialog.png"))
    dialog.close()
    from rsrefseg_qgis.settings_dialog import SettingsDialog

    settings = SettingsDialog(iface.mainWindow())
    settings.show()
    REPORT["settings"] = settings.values()
    settings.grab().save(str(SHOTS / "qgis_settings_dialog.png"))
    settings.close()
    QTimer.singleShot(200, guarded(bad_checkpoint))


def bad_checkpoint() -> None:
    """A failing run: the CLI's error line must reach the message bar."""
    try:
        processing.run("rsrefseg:segment", {
            "INPUT": CONFIG["scene"], "EXPRESSIONS": "the building", "CHECKPOINT": CONFIG["bad_checkpoint"],
            "OUTPUT": CONFIG["vector"] + ".bad.gpkg", "OUTPUT_MASK": CONFIG["mask"] + ".bad.tif"})
        REPORT["bad_run"] = "succeeded"
    except QgsProcessingException as exc:
        REPORT["bad_run"] = str(exc)
    QTimer.singleShot(1000, guarded(message_bar))


def message_bar() -> None:
    items = iface.messageBar().items()
    REPORT["message_bar"] = [[item.title(), item.text()] for item in items]
    iface.mainWindow().grab().save(str(SHOTS / "qgis_error_message.png"))
    REPORT["done"] = True
    save_report()
    QTimer.singleShot(200, quit_qgis)


def quit_qgis() -> None:
    save_report()
    threading.Timer(60, os._exit, (3,)).start()  # should a dialog still block the exit
    QgsProject.instance().clear()  # no "save the project?" / "temporary layers" questions
    iface.actionExit().trigger()


QTimer.singleShot(2000, segment)
