"""Encoded scenes in the web demo (``rsrefseg serve --features-root DIR``), through the service and the
Gradio callbacks (no browser): only folders under DIR are listed and opened, a chosen scene is
decoded (never read nor encoded) to the same masks as the tiled upload, errors name no server path."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from rsrefseg.demo_features import list_feature_folders, resolve_feature_folder
from rsrefseg.demo_service import DemoService, Limits
from rsrefseg.errors import ConfigError, DataError

from .test_demo_service import _geotiff, tiny_predictor

TEXT = "the building\nthe road"
LIMITS = Limits(max_pixels=200 * 200, tile_threshold=40 * 40)  # the 90 x 150 scene is tiled


@pytest.fixture(scope="module")
def predictor() -> Any:
    return tiny_predictor()


@pytest.fixture(scope="module")
def tree(predictor: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``root/scene`` and ``root/run1/other`` (feature folders of one 90 x 150 GeoTIFF, default tiling),
    a plain folder, and next to ``root`` a feature folder ``outside`` that links in ``root`` lead to."""
    from rsrefseg.inference.features import encode_scene

    base = tmp_path_factory.mktemp("demo-features")
    tif = _geotiff(base / "scene.tif", height=90, width=150)
    root = base / "root"
    encode_scene(predictor, tif, root / "scene")
    shutil.copytree(root / "scene", root / "run1" / "other")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not features")
    outside = Path(shutil.copytree(root / "scene", base / "outside"))
    (root / "link-out").symlink_to(outside, target_is_directory=True)  # a folder leading out of root
    leaky = Path(shutil.copytree(root / "scene", root / "leaky"))  # inside, but one window file points out
    window = next((leaky / "windows").glob("w*.safetensors"))
    window.unlink()
    window.symlink_to(next((outside / "windows").glob("w*.safetensors")))
    (root / "link-in").symlink_to(root / "scene", target_is_directory=True)  # stays inside root: fine
    return {"base": base, "tif": tif, "root": root, "outside": outside}


def test_only_folders_under_the_root_are_listed_and_opened(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert list_feature_folders(root) == ["link-in", "run1/other", "scene"]
    assert list_feature_folders(root / "scene") == ["."]
    assert resolve_feature_folder(root, "run1/other") == root / "run1" / "other"
    for name in ("link-out", "leaky", "notes", "../outside", str(tree["outside"]), "scene/../../outside", "", "/"):
        with pytest.raises(DataError, match="no such encoded scene on this server"):
            resolve_feature_folder(root, name)
    with pytest.raises(ConfigError, match="not a folder"):
        list_feature_folders(tree["tif"])


def test_a_chosen_scene_decodes_like_the_tiled_upload(predictor: Any, tree: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    service = DemoService(predictor, LIMITS, workdir=tmp_path / "w", features_root=tree["root"])
    assert service.feature_folders() == ["link-in", "run1/other", "scene"]
    upload = service.run(tree["tif"], TEXT)  # the upload itself, tile by tile with the default tiling
    upload_tiles = service.encoded_tiles
    assert service.encodes == 1 and upload_tiles >= 1

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the scene was read or encoded")

    monkeypatch.setattr(predictor, "encode", never)
    preview = service.load_features("run1/other")
    assert preview.shape == (90, 150, 3) and preview.dtype == np.uint8
    result = service.run(None, TEXT, features="run1/other")
    again = service.run(None, "the road", features="run1/other")  # the same folder stays open
    assert service.encodes == 1 and service.encoded_tiles == upload_tiles
    assert "run1/other" not in result.summary and "**other**" in result.summary and "tile by tile" in result.summary
    for a, b in zip(result.records, upload.records, strict=True):
        assert (a["expression"], a["score"], a["mask_pixels"], a["polygons"]) == \
            (b["expression"], b["score"], b["mask_pixels"], b["polygons"])
    masks = [d for d in result.downloads if d.endswith(".mask.png")]
    references = [d for d in upload.downloads if d.endswith(".mask.png")]
    assert len(masks) == 2 and any(np.asarray(Image.open(m)).any() for m in masks)
    for mine, reference in zip(masks, references, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(mine)), np.asarray(Image.open(reference)))
    assert again.records[0]["mask_pixels"] == result.records[1]["mask_pixels"]
    assert any(d.endswith(".geojson") for d in result.downloads)  # georeferenced: GeoJSON from the folder's georef


def test_refusals_name_no_server_path(predictor: Any, tree: dict[str, Path], tmp_path: Path) -> None:
    plain = DemoService(predictor, LIMITS, workdir=tmp_path / "w")
    assert plain.feature_folders() == []
    with pytest.raises(ConfigError, match="offers no encoded scenes"):
        plain.run(None, TEXT, features="scene")
    with pytest.raises(ConfigError, match="upload an image or choose an encoded scene first"):
        plain.run(None, TEXT)
    service = DemoService(predictor, LIMITS, workdir=tmp_path / "w2", features_root=tree["root"])
    for name in ("link-out", "../outside"):
        with pytest.raises(DataError, match="no such encoded scene"):
            service.run(None, TEXT, features=name)
        with pytest.raises(DataError, match="no such encoded scene"):
            service.load_features(name)
    # a folder made with another model: one line, named relative to the root
    import torch

    trained = tiny_predictor()
    with torch.no_grad():
        next(trained.model.prompter.parameters()).mul_(1.5)
    other = DemoService(trained, LIMITS, workdir=tmp_path / "w3", features_root=tree["root"])
    with pytest.raises(ConfigError) as info:
        other.load_features("run1/other")
    message = str(info.value)
    assert message.startswith("run1/other: features were made with another checkpoint") and "\n" not in message
    assert str(tree["base"]) not in message
    small = DemoService(predictor, Limits(max_pixels=1000), workdir=tmp_path / "w4", features_root=tree["root"])
    with pytest.raises(DataError, match="above the limit of 1000 pixels") as info:
        small.run(None, TEXT, features="scene")
    assert str(tree["base"]) not in str(info.value)


def test_gradio_callbacks(predictor: Any, tree: dict[str, Path], tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    from types import SimpleNamespace

    from rsrefseg.app import make_feature_handler, make_handlers
    from rsrefseg.demo_storage import SessionFiles

    sessions = SessionFiles(tmp_path / "server")
    service = DemoService(predictor, LIMITS, workdir=sessions.runs, features_root=tree["root"])
    choose, handlers = make_feature_handler(service, sessions), make_handlers(service, sessions)
    alice = SimpleNamespace(session_hash="alice")
    assert choose(None, alice) is None
    preview = Path(choose("scene", alice))
    assert preview.is_file() and preview.is_relative_to(sessions.runs)
    overlays, _, downloads, summary = handlers.run(None, TEXT, 0.5, "", alice, "scene")  # no upload needed
    assert "**scene**" in summary
    assert len(overlays) == 2 and all(Path(p).is_relative_to(sessions.runs) for p in downloads)
    with pytest.raises(gr.Error) as info:
        choose("../outside", alice)
    assert info.value.message == "../outside: no such encoded scene on this server (choose one from the list)"
    handlers.end(alice)
    assert not preview.exists()


@pytest.mark.slow
def test_page_lists_the_encoded_scenes(predictor: Any, tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    gr = pytest.importorskip("gradio")
    from rsrefseg.app import build_app

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # build_app sets it; restored after the test
    demo = build_app(predictor, max_pixels=200 * 200, features_root=tree["root"])
    lists = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.elem_id == "rsrefseg-features"]
    assert len(lists) == 1 and lists[0].visible
    assert [c[1] for c in lists[0].choices] == ["link-in", "run1/other", "scene"]
    with pytest.raises(ConfigError, match="not a folder"):
        build_app(predictor, features_root=tree["tif"])
