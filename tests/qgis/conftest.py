"""Fixtures of the QGIS plugin tests.

QGIS runs in its own (system) Python, not in the project's venv: the tests launch it as a
subprocess. Without QGIS the tests skip, except in CI (``CI=true``) where they fail, so a CI image
that lost QGIS is noticed.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "qgis_plugin"
#: QGIS's Python (Debian: /usr/bin/python3 with python3-qgis); override with RSREFSEG_QGIS_PYTHON.
QGIS_PYTHON = os.environ.get("RSREFSEG_QGIS_PYTHON", "/usr/bin/python3")


def in_ci() -> bool:
    """True under CI (``CI=true``), where missing QGIS fails the tests instead of skipping them."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip, or fail under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the QGIS tests must run in CI; .ci/run installs QGIS with apt)")
    pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def qgis_python_problem() -> str | None:
    """Why QGIS's Python cannot be used (None when it can)."""
    if not Path(QGIS_PYTHON).is_file():
        return f"{QGIS_PYTHON} not found (apt-get install qgis python3-qgis)"
    done = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core, processing"], capture_output=True, text=True,
                          env=qgis_env(), cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"QGIS's Python ({QGIS_PYTHON}) cannot import qgis.core ({last}); apt-get install qgis python3-qgis"
    return None


def qgis_env(**extra: str) -> dict[str, str]:
    """Environment of a QGIS process: headless, none of the venv's Python variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    env["PYTHONPATH"] = "/usr/share/qgis/python/plugins"  # QGIS's bundled Processing plugin
    env.update(extra)
    return env


def rsrefseg_command() -> str:
    """The venv's ``rsrefseg`` executable (what a user puts in the plugin's environment setting)."""
    script = Path(sys.executable).parent / "rsrefseg"
    return str(script if script.is_file() else Path(sys.executable))


def cli_help(*command: str) -> str:
    """``rsrefseg <command> --help`` of this checkout ("" when there is no such command)."""
    from rsrefseg.cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sub = subparsers.choices.get(command[0])
    return "" if sub is None else sub.format_help()


@pytest.fixture(scope="session")
def qgis_python() -> str:
    """QGIS's Python interpreter (skips, or fails under CI, when QGIS is missing)."""
    problem = qgis_python_problem()
    if problem:
        skip_or_fail(problem)
    return QGIS_PYTHON


@pytest.fixture(scope="session")
def qgis_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``tiny`` checkpoint with non-trivial masks (as tests/inference/conftest.py ``tiny_checkpoint``)."""
    import torch

    from rsrefseg import RSRefSeg
    from rsrefseg.checkpoint import save_checkpoint

    model = RSRefSeg.from_preset("tiny")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "output_hypernetworks_mlps" in name and ".proj_out." in name:
                param.mul_(1000.0)  # logits of std ~0.1 instead of ~1e-4, so masks are not empty
    return save_checkpoint(model, tmp_path_factory.mktemp("qgis-ckpt") / "ckpt")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are kept (``$RSREFSEG_ARTIFACTS`` or a temporary folder)."""
    env = os.environ.get("RSREFSEG_ARTIFACTS")
    folder = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
