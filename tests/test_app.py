"""Tests of the Gradio page (rsrefseg.app) and ``rsrefseg serve`` argument handling, without a browser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rsrefseg.demo_service import DemoService
from rsrefseg.errors import ConfigError
from tests.test_demo_service import _png, small_service, tiny_predictor


@pytest.fixture(scope="module")
def predictor() -> Any:
    return tiny_predictor()


@pytest.fixture()
def service(predictor: Any, tmp_path: Path) -> DemoService:
    return small_service(predictor, tmp_path)


# ---------------------------------------------------------------- Gradio glue
def test_handlers_turn_failures_into_one_line_gradio_errors(service: DemoService, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gr = pytest.importorskip("gradio")
    from rsrefseg.app import make_handlers

    on_upload, on_run = make_handlers(service)
    ok = _png(tmp_path / "ok.png", 32, 48)
    assert on_upload(None) is None
    assert on_upload(str(ok)).shape == (32, 48, 3)
    overlays, heatmaps, downloads, summary = on_run(str(ok), "the ship", 0.5)
    assert len(overlays) == len(heatmaps) == 1 and downloads[0].endswith("ok_masks.zip") and "ok.png" in summary

    with pytest.raises(gr.Error) as info:
        on_run(None, "the ship", 0.5)
    assert info.value.message == "upload an image first"
    big = _png(tmp_path / "huge.png", 300, 300)
    for call in (lambda: on_upload(str(big)), lambda: on_run(str(big), "the ship", 0.5)):
        with pytest.raises(gr.Error) as info:
            call()
        assert info.value.message == "huge.png: image is 300 x 300 = 0.09 MP, above the limit of 0.04 MP (40000 pixels)"

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of\nmemory")

    monkeypatch.setattr(service.predictor, "predict", boom)
    with pytest.raises(gr.Error, match="internal error: RuntimeError: out of memory"):
        on_run(str(ok), "the ship", 0.5)


def test_build_app_with_a_predictor(predictor: Any) -> None:
    gr = pytest.importorskip("gradio")
    from rsrefseg.app import build_app

    demo = build_app(predictor, max_upload_mb=1, max_pixels=1000, concurrency=2, max_queue=3)
    assert isinstance(demo, gr.Blocks)
    queue = getattr(demo, "_queue", None)
    if queue is not None:  # Gradio internals: checked when present
        assert queue.max_size == 3 and queue.default_concurrency_limit == 2
    for bad in ({"concurrency": 0}, {"tile_cache_mb": -1.0}):
        with pytest.raises(ConfigError):
            build_app(predictor, **bad)


def test_import_has_no_side_effects() -> None:
    code = ("import sys, rsrefseg.app, rsrefseg.cli.serve_cli; "
            "print(sorted(m for m in ('gradio', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- rsrefseg serve
def test_serve_arguments() -> None:
    from rsrefseg.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--checkpoint", "ckpt", "--max-pixels", "100x200", "--port", "8000",
                              "--max-upload-mb", "2.5", "--concurrency", "3", "--tile-cache-mb", "0"])
    assert (args.checkpoint, args.host, args.port, args.max_pixels, args.max_upload_mb, args.concurrency,
            args.tile_cache_mb) == ("ckpt", "127.0.0.1", 8000, 20_000, 2.5, 3, 0.0)
    defaults = parser.parse_args(["serve", "--checkpoint", "ckpt"])
    assert (defaults.port, defaults.max_upload_mb, defaults.max_pixels, defaults.concurrency,
            defaults.tile_cache_mb) == (7860, 50.0, 4096**2, 1, 2048.0)
    for bad in (["--port", "0"], ["--max-pixels", "0"], ["--max-upload-mb", "-1"], ["--concurrency", "0"],
                ["--tile-cache-mb", "-1"], ["--tile-cache-mb", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--checkpoint", "ckpt", *bad])


def test_serve_bad_checkpoint_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gradio")
    from rsrefseg.cli.main import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err
