"""The plugin's QGIS-free parts, in the project's venv: finding rsrefseg, running it as a subprocess
(progress, errors, cancellation), reading summary.json; the plugin's imports; the zip of ``make qgis-plugin``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import PLUGIN_DIR, ROOT

sys.path.insert(0, str(PLUGIN_DIR))
from rsrefseg_qgis import results, runner


class FakeFeedback:
    """What the runner uses of QgsProcessingFeedback; optionally cancels at the first progress line."""

    def __init__(self, cancel_on_progress: bool = False) -> None:
        self.cancel_on_progress = cancel_on_progress
        self.cancelled = False
        self.progress: list[float] = []
        self.texts: list[str] = []
        self.errors: list[str] = []
        self.console: list[str] = []

    def isCanceled(self) -> bool:
        return self.cancelled

    def setProgress(self, value: float) -> None:
        self.progress.append(value)

    def setProgressText(self, text: str) -> None:
        self.texts.append(text)
        if self.cancel_on_progress:
            self.cancelled = True

    def pushInfo(self, text: str) -> None:
        self.console.append(text)

    def pushConsoleInfo(self, text: str) -> None:
        self.console.append(text)

    def reportError(self, text: str, fatal: bool = False) -> None:
        self.errors.append(text)


def fake_cli(tmp_path: Path, body: str) -> list[str]:
    """A Python script standing in for rsrefseg (argv for run_cli)."""
    script = tmp_path / "fake_rsrefseg.py"
    script.write_text("import json, os, signal, sys, time\n" + textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(script)]


def line(stage: str, done: int, total: int) -> str:
    return json.dumps({"event": "progress", "stage": stage, "done": done, "total": total,
                       "fraction": done / total, "message": ""})


def test_progress_tracker_nests_stages() -> None:
    tracker = runner.ProgressTracker()
    assert tracker.update(json.loads(line("predict", 0, 2))) == 0.0
    assert tracker.update(json.loads(line("tiles", 0, 4))) == 0.0
    assert tracker.update(json.loads(line("tiles", 2, 4))) == pytest.approx(0.25)  # image 1 half done
    assert tracker.update(json.loads(line("predict", 1, 2))) == pytest.approx(0.5)  # tiles state forgotten
    assert tracker.update(json.loads(line("tiles", 1, 4))) == pytest.approx(0.625)
    assert tracker.update(json.loads(line("predict", 2, 2))) == pytest.approx(1.0)
    assert runner.ProgressTracker().update({"event": "progress", "stage": "x", "done": 3, "total": None}) is None


def test_run_cli_reports_progress_errors_and_status(tmp_path: Path) -> None:
    argv = fake_cli(tmp_path, f"""
        print({line("predict", 0, 1)!r}, file=sys.stderr, flush=True)
        print({line("predict", 1, 1)!r}, file=sys.stderr, flush=True)
        print("some warning", file=sys.stderr)
        print("error: /x/ckpt/model.safetensors: no such checkpoint file", file=sys.stderr)
        print('{{"event": "done", "scenes": []}}', file=sys.stderr)
        print("summary line")
        sys.exit(2)
    """)
    feedback = FakeFeedback()
    result = runner.run_cli(argv, feedback)
    assert result.returncode == 2
    assert result.errors == ["error: /x/ckpt/model.safetensors: no such checkpoint file"]
    assert feedback.errors == result.errors
    assert feedback.progress == [0.0, 100.0]
    assert feedback.texts == ["predict: 0/1", "predict: 1/1"]
    assert result.events == [{"event": "done", "scenes": []}]
    assert result.stdout == ["summary line"] and "some warning" in result.stderr_tail
    with pytest.raises(runner.CliFailed, match="no such checkpoint file") as info:
        runner.check(result)
    assert str(info.value) == "error: /x/ckpt/model.safetensors: no such checkpoint file"


def test_a_crash_without_error_line_reports_the_stderr_tail(tmp_path: Path) -> None:
    argv = fake_cli(tmp_path, """
        print("Traceback (most recent call last):", file=sys.stderr)
        print("RuntimeError: boom", file=sys.stderr)
        sys.exit(1)
    """)
    result = runner.run_cli(argv, FakeFeedback())
    with pytest.raises(runner.CliFailed, match=r"exited with status 1:\nTraceback.*\nRuntimeError: boom"):
        runner.check(result)


def test_argparse_errors_count_as_error_lines(tmp_path: Path) -> None:
    argv = fake_cli(tmp_path, """
        print("usage: rsrefseg predict [-h]", file=sys.stderr)
        print("rsrefseg predict: error: unrecognized arguments: --vector-format gpkg", file=sys.stderr)
        sys.exit(2)
    """)
    result = runner.run_cli(argv, FakeFeedback())
    assert result.errors == ["rsrefseg predict: error: unrecognized arguments: --vector-format gpkg"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not reaped by its parent) counts as gone
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


@pytest.mark.parametrize("ignore_term", [False, True])
def test_cancel_terminates_the_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignore_term: bool) -> None:
    monkeypatch.setattr(runner, "TERMINATE_GRACE_S", 0.5)
    pid_file = tmp_path / "pid"
    argv = fake_cli(tmp_path, f"""
        if {ignore_term}:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        print({line("predict", 0, 1)!r}, file=sys.stderr, flush=True)
        time.sleep(60)
        open({str(tmp_path / "late")!r}, "w").write("should never be written")
    """)
    feedback = FakeFeedback(cancel_on_progress=True)
    start = time.monotonic()
    with pytest.raises(runner.Cancelled):
        runner.run_cli(argv, feedback)
    assert time.monotonic() - start < 30  # not the script's 60 s sleep
    assert not _alive(int(pid_file.read_text()))
    assert not (tmp_path / "late").exists()


def test_resolve_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    assert runner.resolve_command(str(env)) == [str(env / "bin" / "python"), "-m", "rsrefseg"]
    (env / "bin" / "rsrefseg").write_text("")
    (env / "bin" / "rsrefseg").chmod(0o755)  # shutil.which wants an executable
    assert runner.resolve_command(str(env)) == [str(env / "bin" / "rsrefseg")]
    assert runner.resolve_command(f'"{env / "bin" / "rsrefseg"}"') == [str(env / "bin" / "rsrefseg")]
    assert runner.resolve_command(str(env / "bin" / "python")) == [str(env / "bin" / "python"), "-m", "rsrefseg"]
    with pytest.raises(runner.RSRefSegNotFound, match="no such file or folder"):
        runner.resolve_command(str(tmp_path / "missing"))
    with pytest.raises(runner.RSRefSegNotFound, match="no rsrefseg command or Python"):
        runner.resolve_command(str(tmp_path))
    monkeypatch.setenv("PATH", str(env / "bin"))
    assert runner.resolve_command("") == [str(env / "bin" / "rsrefseg")]
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(runner.RSRefSegNotFound, match="not found on PATH"):
        runner.resolve_command("  ")


def test_unstartable_command_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(runner.RSRefSegNotFound, match="cannot start rsrefseg"):
        runner.run_cli([str(tmp_path / "nope")], FakeFeedback())


def test_child_env_drops_qgis_python_variables() -> None:
    env = runner.child_env({"PYTHONHOME": "/qgis", "PYTHONPATH": "/qgis/py", "PATH": "/bin", "VIRTUAL_ENV": "x"})
    assert "PYTHONHOME" not in env and "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"
    env = runner.child_env({"PYTHONPATH": "/qgis/py", runner.CHILD_PYTHONPATH_VAR: "/dev/src"})
    assert env["PYTHONPATH"] == "/dev/src"


def _summary(tmp_path: Path, record: dict[str, Any], failures: list[dict[str, Any]] | None = None) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    summary = {"images": [record] if record else [], "failures": failures or [], "expressions": ["a", "b"]}
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return out


def test_results_prefer_the_combined_vector(tmp_path: Path) -> None:
    out = _summary(tmp_path, {"source": "s.tif", "crs": "EPSG:32616", "vector": "s/s.gpkg", "vector_format": "gpkg",
                              "outputs": [{"index": 1, "expression": "a", "score": 0.5, "geojson": "s/01_a.geojson",
                                           "mask_tif": "s/01_a.mask.tif"}]})
    got = results.image_outputs(results.read_summary(out), out)
    assert got.vector == out / "s" / "s.gpkg" and got.vector_format == "gpkg"
    assert got.expressions[0].geojson == out / "s" / "01_a.geojson"
    assert got.expressions[0].mask_tif == out / "s" / "01_a.mask.tif"
    results.check_georeferenced(got)


def test_results_of_an_older_cli_and_of_failures(tmp_path: Path) -> None:
    out = _summary(tmp_path, {"source": "p.png", "crs": None, "outputs": [{"index": 1, "expression": "a"}]})
    got = results.image_outputs(results.read_summary(out), out)
    assert got.vector is None and got.expressions[0].geojson is None
    with pytest.raises(results.SummaryError, match="no georeference"):
        results.check_georeferenced(got)
    other = tmp_path / "other"
    other.mkdir()
    out2 = _summary(other, {}, failures=[{"error": "x.tif: corrupt file"}])
    with pytest.raises(results.SummaryError, match=r"x\.tif: corrupt file"):
        results.image_outputs(results.read_summary(out2), out2)
    with pytest.raises(results.SummaryError, match="cannot read"):
        results.read_summary(tmp_path / "missing")


ALLOWED_TOP_LEVEL = {"qgis", "osgeo", "processing"}


def test_plugin_imports_only_qgis_and_the_standard_library() -> None:
    """QGIS's Python has none of our dependencies: the plugin must not import rsrefseg, torch, numpy..."""
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in sorted((PLUGIN_DIR / "rsrefseg_qgis").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names
                    if n.split(".")[0] not in stdlib | ALLOWED_TOP_LEVEL and n != "__future__"]
    assert bad == []


def test_make_qgis_plugin_builds_an_installable_zip(tmp_path: Path) -> None:
    out = tmp_path / "rsrefseg_qgis.zip"
    (PLUGIN_DIR / "rsrefseg_qgis" / "__pycache__").mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_qgis_plugin.py"), "--out", str(out)], check=True,
                   capture_output=True)
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
        metadata = archive.read("rsrefseg_qgis/metadata.txt").decode("utf-8")
    assert all(n.startswith("rsrefseg_qgis/") for n in names)  # one folder at the top, as QGIS expects
    assert {"rsrefseg_qgis/__init__.py", "rsrefseg_qgis/metadata.txt", "rsrefseg_qgis/icon.svg",
            "rsrefseg_qgis/algorithms/segment.py"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for key in ("name=RSRefSeg", "qgisMinimumVersion=", "version=", "hasProcessingProvider=yes", "icon=icon.svg"):
        assert key in metadata
