"""The package has no side effects at import and exposes its API lazily."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_side_effect_free() -> None:
    code = (
        "import sys, rsrefseg; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'gradio', 'rasterio') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lazy_exports() -> None:
    import rsrefseg

    assert rsrefseg.RSRefSeg.__name__ == "RSRefSeg"
    assert rsrefseg.RSRefSegConfig().preset == "rsrefseg-b"
    assert rsrefseg.optimize_for_inference.__module__ == "rsrefseg.modeling.optimize"


def test_cli_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "rsrefseg", "--help"], capture_output=True, text=True, check=True)
    for command in ("info", "init-base", "data"):
        assert command in out.stdout


def test_cli_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from rsrefseg.cli.main import build_parser; build_parser(); "
        "print([m for m in ('torch', 'transformers', 'gradio', 'rasterio', 'pyogrio') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
