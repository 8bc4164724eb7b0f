"""The plugin in the QGIS desktop (under Xvfb): installed from the zip of ``make qgis-plugin`` into a fresh
profile, a GeoTIFF and the styled result layers loaded, screenshots saved under the artifacts folder
(``$RSREFSEG_ARTIFACTS``: qgis_canvas.png, qgis_window.png, qgis_algorithm_dialog.png,
qgis_settings_dialog.png, qgis_error_message.png)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, qgis_env, rsrefseg_command, skip_or_fail

pytestmark = pytest.mark.slow

EXPRESSIONS = ["the building", "water"]


def test_plugin_in_the_qgis_desktop(qgis_python: str, qgis_checkpoint: Path, shared_data: Path, artifacts: Path,
                                    tmp_path: Path) -> None:
    for tool in ("qgis", "xvfb-run"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} not found (apt-get install qgis xvfb xauth)")
    scene = shared_data / "geotiff" / "albers_3band_int16.tif"
    if not scene.is_file():
        pytest.skip(f"{scene} not found")
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_qgis_plugin import build

    # install the zip as Plugins > Install from ZIP does: unpack into the profile's python/plugins
    profile = tmp_path / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(build(tmp_path / "rsrefseg_qgis.zip")) as archive:
        archive.extractall(plugins)
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text(
        "[PythonPlugins]\nrsrefseg_qgis=true\n\n"
        f"[rsrefseg]\nenvironment={rsrefseg_command()}\ncheckpoint={qgis_checkpoint}\ndevice=cpu\nprecision=fp32\n\n"
        "[qgis]\ncheckVersion=false\nshowTips=false\n", encoding="utf-8")
    bad = tmp_path / "bad-checkpoint"
    bad.mkdir()
    shutil.copy(qgis_checkpoint / "config.json", bad / "config.json")
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    config = {"scene": str(scene), "bad_checkpoint": str(bad), "expressions": EXPRESSIONS, "checkpoint": str(qgis_checkpoint),
              "vector": str(tmp_path / "segments.gpkg"), "mask": str(tmp_path / "mask.tif"),
              "artifacts": str(artifacts), "report": str(tmp_path / "report.json")}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    env = qgis_env(RSREFSEG_VISUAL_CONFIG=str(tmp_path / "config.json"), RSREFSEG_PYTHONPATH=str(ROOT / "src"),
                   XDG_RUNTIME_DIR=str(tmp_path), HOME=str(tmp_path / "home"),
                   XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop("QT_QPA_PLATFORM")  # the real X server of Xvfb
    env.pop("PYTHONPATH")
    command = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", "qgis", "--profiles-path", str(tmp_path),
               "--nologo", "--noversioncheck", "--code", str(Path(__file__).with_name("visual_check.py"))]
    # a session of its own, so that a timeout ends xvfb-run, Xvfb and QGIS together
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"QGIS did not finish in 600 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    report_path = tmp_path / "report.json"
    assert report_path.is_file(), f"QGIS exited with {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert "error" not in report, report["error"]
    assert report.get("done"), report
    assert "rsrefseg_qgis" in report["plugins"]  # loaded from the profile, as a user's install
    assert report["raster_valid"]
    names = {layer["name"]: layer for layer in report["layers"]}
    vector = names["the building; water"]
    assert vector["features"] > 0 and vector["crs_equal_raster"]
    assert vector["renderer"] == "categorizedSymbol"
    assert vector["categories"] == ["1. the building", "2. water"]
    for mask_name, band in (("mask: the building", 1), ("mask: water", 2)):
        assert names[mask_name]["renderer"] == "paletted" and names[mask_name]["band"] == band
        assert names[mask_name]["crs_equal_raster"]
    assert report["settings"]["environment"] == rsrefseg_command()
    # the CLI's error line of the failed run is in the message bar
    assert report["bad_run"] != "succeeded"
    assert any(title == "RSRefSeg" and "model.safetensors" in text and text.startswith("error: ")
               for title, text in report["message_bar"]), report["message_bar"]
    assert proc.returncode == 0, "QGIS did not quit cleanly (a dialog blocked the exit?)"
    for shot in ("qgis_canvas.png", "qgis_window.png", "qgis_algorithm_dialog.png", "qgis_settings_dialog.png",
                 "qgis_error_message.png"):
        assert (artifacts / shot).stat().st_size > 10_000, shot
