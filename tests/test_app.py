"""Tests of the Gradio page (rsrefseg.app) and ``rsrefseg serve`` argument handling, without a browser."""

from __future__ import annotations

import os
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

    on_upload, on_run, on_end = make_handlers(service)
    ok = _png(tmp_path / "ok.png", 32, 48)
    assert on_upload(None) is None
    assert on_upload(str(ok)).shape == (32, 48, 3)
    overlays, heatmaps, downloads, summary = on_run(str(ok), "the ship", 0.5)
    assert len(overlays) == len(heatmaps) == 1 and downloads[0].endswith("ok_masks.zip") and "ok.png" in summary
    on_end()  # without sessions: nothing to do

    with pytest.raises(gr.Error) as info:
        on_run(None, "the ship", 0.5)
    assert info.value.message == "upload an image first"
    big = _png(tmp_path / "huge.png", 300, 300)
    for call in (lambda: on_upload(str(big)), lambda: on_run(str(big), "the ship", 0.5)):
        with pytest.raises(gr.Error) as info:
            call()
        assert info.value.message == "huge.png: image is 300 x 300 = 0.09 MP, above the limit of 0.04 MP (40000 pixels)"
    with pytest.raises(gr.Error) as info:
        on_run(str(ok), "the ship", "abc")
    assert info.value.message == "the mask threshold must be a number in (0, 1), got 'abc'"

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of\nmemory " + "x" * 2000)

    monkeypatch.setattr(service.predictor, "predict", boom)
    with pytest.raises(gr.Error) as info:
        on_run(str(ok), "the ship", 0.5)
    message = info.value.message
    assert message.startswith("internal error: RuntimeError: out of memory xxx") and len(message) == 500
    assert message.endswith("…")


def test_handlers_keep_each_session_in_its_folder_and_delete_it_at_the_end(predictor: Any, tmp_path: Path) -> None:
    """With sessions, previews and run outputs go to the session's folder under the server's folder;
    ``end`` deletes them and the uploads only that session used (never files outside the folder)."""
    pytest.importorskip("gradio")
    from types import SimpleNamespace

    from rsrefseg.app import make_handlers
    from rsrefseg.demo_service import Limits
    from rsrefseg.demo_storage import SessionFiles

    root = tmp_path / "server"
    sessions = SessionFiles(root)
    service = DemoService(predictor, Limits(max_pixels=200 * 200), workdir=sessions.runs)
    handlers = make_handlers(service, sessions)
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="../bob")
    (root / "h1").mkdir(parents=True)
    upload_a = _png(root / "h1" / "a.png", 40, 50, seed=1)  # where Gradio would have stored the uploads
    outside = _png(tmp_path / "mine.png", 40, 50, seed=2)  # a file of the user's own (in-process use)

    preview = Path(handlers.upload(str(upload_a), "", alice))
    assert preview.parent.parent == sessions.runs and preview.suffix == ".png"
    from PIL import Image

    with Image.open(preview) as png:
        assert png.size == (50, 40)
    again = Path(handlers.upload(str(upload_a), "", alice))
    assert again != preview and not preview.exists()  # one preview per session, a new name each time
    _, _, downloads, _ = handlers.run(str(upload_a), "the ship", 0.5, "", alice)
    assert all(Path(p).is_relative_to(again.parent) for p in downloads)
    bob_out = handlers.run(str(outside), "the ship", 0.5, "", bob)[2]
    assert all(Path(p).is_relative_to(sessions.runs) for p in bob_out)
    assert sorted(p.parent for p in sessions.runs.iterdir()) == [sessions.runs] * 2  # bob's "../" is no path

    handlers.end(alice)
    assert not again.parent.exists() and not upload_a.exists() and not (root / "h1").exists()
    assert all(Path(p).is_file() for p in bob_out)  # the other session is untouched
    handlers.end(bob)
    assert not sessions.runs.exists() or not any(sessions.runs.iterdir())
    assert outside.is_file()  # not under the server's folder: never deleted
    with pytest.raises(Exception, match="uploaded file not found"):
        handlers.run(str(upload_a), "the ship", 0.5, "", alice)


def test_build_app_with_a_predictor(predictor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gr = pytest.importorskip("gradio")
    from rsrefseg.app import build_app

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # build_app sets it; restored after the test
    demo = build_app(predictor, max_upload_mb=1, max_pixels=1000, concurrency=2, max_queue=3, max_expressions=4)
    assert isinstance(demo, gr.Blocks)
    textboxes = {block.elem_id: block for block in demo.blocks.values() if isinstance(block, gr.Textbox)}
    # The browser cuts a paste one character beyond what the service accepts (which it then refuses).
    assert textboxes["rsrefseg-expressions"].max_length == 4 * 1001 + 1
    assert textboxes["rsrefseg-bands"].max_length == 64
    folder = Path(os.environ["GRADIO_TEMP_DIR"])  # the page's own folder, not the shared /tmp/gradio
    assert folder.name.startswith("rsrefseg-serve-") and folder.stat().st_mode & 0o777 == 0o700
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
                              "--max-upload-mb", "2.5", "--concurrency", "3", "--tile-cache-mb", "0",
                              "--workdir", "/srv/demo"])
    assert (args.checkpoint, args.host, args.port, args.max_pixels, args.max_upload_mb, args.concurrency,
            args.tile_cache_mb, args.workdir) == ("ckpt", "127.0.0.1", 8000, 20_000, 2.5, 3, 0.0, "/srv/demo")
    defaults = parser.parse_args(["serve", "--checkpoint", "ckpt"])
    assert (defaults.port, defaults.max_upload_mb, defaults.max_pixels, defaults.concurrency,
            defaults.tile_cache_mb, defaults.workdir) == (7860, 50.0, 4096**2, 1, 2048.0, None)
    for bad in (["--port", "0"], ["--max-pixels", "0"], ["--max-upload-mb", "-1"], ["--concurrency", "0"],
                ["--tile-cache-mb", "-1"], ["--tile-cache-mb", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--checkpoint", "ckpt", *bad])


def test_serve_bad_checkpoint_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gradio")
    from rsrefseg.cli.main import main

    monkeypatch.setenv("GRADIO_TEMP_DIR", "/elsewhere")
    umask = os.umask(0o022)
    try:
        assert main(["serve", "--checkpoint", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")]) == 2
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(umask)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err
    assert list((tmp_path / "w").iterdir()) == []  # its folder was made, then deleted
    assert os.environ["GRADIO_TEMP_DIR"] == "/elsewhere"  # restored
    unwritable = tmp_path / "file"
    unwritable.write_text("x")
    assert main(["serve", "--checkpoint", str(tmp_path / "nope"), "--workdir", str(unwritable / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {unwritable / 'sub'}: cannot create the server's work folder") and "\n" not in err
