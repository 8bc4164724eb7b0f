"""Tests for rsrefseg.inference.jobs (input expansion, local STAC) and rsrefseg.inference.manifest
(resume manifest: concurrent writers, torn lines, killed writers)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import rasterio

from rsrefseg import paths
from rsrefseg.errors import DataError
from rsrefseg.inference.jobs import (
    IMAGE_SUFFIXES,
    MANIFEST_NAME,
    Manifest,
    SceneInput,
    content_hash,
    expand_inputs,
    read_path_list,
    read_stac,
    remove_temporaries,
)

TIFS = ["albers_3band_int16.tif", "landsat_large_nodata_wgs84.tif", "multispectral_4band_float64.tif",
        "spacenet_pan_uint16.tif"]


@pytest.fixture()
def geotiffs() -> Path:
    root = paths.geotiff_root()
    if not (root / TIFS[0]).is_file():
        pytest.skip(f"shared GeoTIFF samples not available in {root} (set $RSREFSEG_DATA)")
    return root


@pytest.fixture()
def linked(tmp_path: Path, geotiffs: Path) -> Path:
    """``tmp/imgs/`` with symbolic links to the shared GeoTIFFs (the data is never copied)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in TIFS:
        (folder / name).symlink_to(geotiffs / name)
    return folder


def test_folder_glob_and_dedup_on_the_shared_samples(geotiffs: Path) -> None:
    scenes = expand_inputs([str(geotiffs)])
    assert [s.path.name for s in scenes] == TIFS  # sorted, images only (no .geojson)
    assert [s.name for s in scenes] == [Path(t).stem for t in TIFS]
    assert all(s.key == str(s.path.resolve()) and s.item is None for s in scenes)
    again = expand_inputs([str(geotiffs / "spacenet*.tif"), str(geotiffs), str(geotiffs / ".." / "geotiff" / TIFS[0])])
    assert [s.path.name for s in again] == [TIFS[3], TIFS[0], TIFS[1], TIFS[2]]  # first place kept
    with pytest.raises(DataError, match="no file matches this pattern"):
        expand_inputs([str(geotiffs / "*.nothing")])
    with pytest.raises(DataError, match="no such image file or folder"):
        expand_inputs([str(geotiffs / "missing.tif")])


def test_image_suffixes_match_the_predict_command() -> None:
    from rsrefseg.cli import predict_cli

    assert predict_cli.IMAGE_SUFFIXES == IMAGE_SUFFIXES


def test_path_list_with_comments_relative_paths_globs_and_bom(tmp_path: Path, linked: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    text = "\n".join([
        "# scenes of the archive job",
        "",
        f"  ../imgs/{TIFS[3]}  ",
        f"{linked / TIFS[0]}",
        "../imgs/l*.tif",
        "   # indented comment",
    ])
    (lists / "paths.txt").write_text("\ufeff" + text + "\n", encoding="utf-8")
    assert read_path_list(lists / "paths.txt") == [str(lists / f"../imgs/{TIFS[3]}"), str(linked / TIFS[0]),
                                                    str(lists / "../imgs/l*.tif")]
    scenes = expand_inputs([f"@{lists / 'paths.txt'}"])
    assert [s.path.name for s in scenes] == [TIFS[3], TIFS[0], TIFS[1]]
    (lists / "bad.txt").write_text(f"../imgs/{TIFS[0]}\n@paths.txt\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.txt: .*@paths.txt: no such image file"):
        expand_inputs([f"@{lists / 'bad.txt'}"])
    (lists / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match="names no input"):
        expand_inputs([f"@{lists / 'empty.txt'}"])
    with pytest.raises(DataError, match="path list not found"):
        expand_inputs([f"@{lists / 'missing.txt'}"])
    (lists / "latin1.txt").write_bytes("caf\xe9.tif\n".encode("latin-1"))
    with pytest.raises(DataError, match="cannot read the path list"):
        expand_inputs([f"@{lists / 'latin1.txt'}"])
    with pytest.raises(DataError, match="not a regular file"):
        read_path_list("/dev/zero")


def _item(item_id: str, assets: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "geometry": None, "properties": {},
            "links": [], "assets": assets}


def _write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_stac_item_asset_selection_and_href_rules(tmp_path: Path, linked: Path) -> None:
    (linked / "with space.tif").symlink_to(linked / TIFS[3])
    assets = {
        "visual": {"href": f"../imgs/{TIFS[0]}", "type": "image/tiff; application=geotiff", "roles": ["data"]},
        "metadata": {"href": "meta.xml", "type": "application/xml"},
        "pan": {"href": f"file://{linked / TIFS[3]}"},
        "spaced": {"href": "../imgs/with%20space.tif"},
        "remote": {"href": "https://example.com/scene.tif", "type": "image/tiff"},
        "vsi": {"href": "/vsicurl/https://example.com/scene.tif"},
        "gone": {"href": "../imgs/nothing.tif"},
    }
    item = _write(tmp_path / "stac" / "item.json", _item("LC08_0001", assets))
    [scene] = expand_inputs([str(item)], stac_asset="visual")
    assert scene == SceneInput("LC08_0001", tmp_path / "stac" / f"../imgs/{TIFS[0]}", "LC08_0001", "LC08_0001",
                               "visual")
    with rasterio.open(scene.path) as ds:  # the asset really is the shared raster
        assert ds.width == 512
    assert read_stac(item, "pan")[0].path == linked / TIFS[3]
    assert read_stac(item, "spaced")[0].path.name == "with space.tif"
    with pytest.raises(DataError, match=r"item.json: STAC item 'LC08_0001' has no asset 'red' \(available: "
                                        r"gone, metadata, pan, remote, spaced, visual, vsi\)"):
        read_stac(item, "red")
    with pytest.raises(DataError, match=r"remote href .https://example\.com/scene\.tif. refused"):
        read_stac(item, "remote")
    with pytest.raises(DataError, match=r"GDAL virtual file system path .* refused"):
        read_stac(item, "vsi")
    with pytest.raises(DataError, match=r"asset 'gone': file '../imgs/nothing.tif' not found"):
        read_stac(item, "gone")
    with pytest.raises(DataError, match="choose the raster asset with --stac-asset"):
        read_stac(item)  # several assets look like rasters
    single = _write(tmp_path / "stac" / "single.json", _item("one", {"visual": assets["visual"],
                                                                      "metadata": assets["metadata"]}))
    assert read_stac(single)[0].asset == "visual"  # the only raster asset


def test_stac_item_collection_keys_names_and_errors(tmp_path: Path, linked: Path) -> None:
    items = [_item(f"scene-{i}", {"data": {"href": f"{linked / name}"}}) for i, name in enumerate(TIFS[:3])]
    items.append(_item("../../escape/x", {"data": {"href": str(linked / TIFS[3])}}))
    collection = _write(tmp_path / "items.json", {"type": "FeatureCollection", "features": items})
    scenes = expand_inputs([str(collection), str(linked / TIFS[0])], stac_asset="data")
    assert [s.key for s in scenes] == ["scene-0", "scene-1", "scene-2", "../../escape/x"]  # file 0 deduplicated
    assert scenes[3].name == "_.._escape_x" and "/" not in scenes[3].name
    duplicate = _write(tmp_path / "dup.json", {"type": "FeatureCollection", "features": [
        _item("same", {"data": {"href": str(linked / TIFS[0])}}), _item("same", {"data": {"href": str(linked / TIFS[1])}})]})
    with pytest.raises(DataError, match="scene key 'same' names two files"):
        expand_inputs([str(duplicate)], stac_asset="data")
    cases = {
        "catalog.json": ({"type": "Catalog", "id": "c", "links": []}, "STAC Catalog is not supported"),
        "plain.json": ([1, 2, 3], "not a STAC Item or ItemCollection"),
        "noid.json": ({"type": "Feature", "assets": {}}, "STAC item #1 has no id"),
        "noassets.json": ({"type": "Feature", "id": "x"}, "STAC item 'x' has no assets"),
    }
    for name, (doc, message) in cases.items():
        with pytest.raises(DataError, match=message):
            read_stac(_write(tmp_path / name, doc))
    (tmp_path / "broken.json").write_text('{"type": "Feature", ', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        expand_inputs([str(tmp_path / "broken.json")])
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000, encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        read_stac(tmp_path / "deep.json")


def _output(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest_done_only_with_complete_outputs(tmp_path: Path) -> None:
    exprs, settings = content_hash(["the lake", "roads"]), content_hash({"tile": 512, "threshold": 0.0})
    a = _output(tmp_path, "scene-a/a.gpkg", "vector")
    b = _output(tmp_path, "scene-a/01_lake.mask.tif", "mask bytes")
    manifest = Manifest(tmp_path)
    assert not manifest.is_done("a", exprs, settings)
    entry = manifest.record("a", exprs, settings, [a, "scene-a/01_lake.mask.tif"], info={"polygons": 3})
    assert entry.outputs == (("scene-a/a.gpkg", 6), ("scene-a/01_lake.mask.tif", 10))
    fresh = Manifest(tmp_path)  # e.g. the rerun
    assert fresh.is_done("a", exprs, settings)
    assert fresh.lookup("a", exprs, settings).info == {"polygons": 3}
    assert not fresh.is_done("a", content_hash(["roads", "the lake"]), settings)  # order matters
    assert not fresh.is_done("a", exprs, content_hash({"tile": 1024, "threshold": 0.0}))
    assert content_hash({"threshold": 0.0, "tile": 512}) == settings  # key order does not
    b.write_text("partially rewritten", encoding="utf-8")
    assert not fresh.is_done("a", exprs, settings)  # size differs: redo
    b.unlink()
    assert not fresh.is_done("a", exprs, settings)
    _output(tmp_path, "scene-a/01_lake.mask.tif", "new mask bytes!")
    fresh.record("a", exprs, settings, [a, b])
    assert Manifest(tmp_path).is_done("a", exprs, settings)  # the latest line wins
    assert len(Manifest(tmp_path).entries()) == 1
    with pytest.raises(ValueError, match="does not exist"):
        fresh.record("b", exprs, settings, ["scene-b/none.tif"])
    outside = _output(tmp_path.parent / f"{tmp_path.name}-other", "x.tif", "x")
    with pytest.raises(ValueError, match="not inside"):
        fresh.record("b", exprs, settings, [outside])


def test_manifest_ignores_torn_and_hostile_lines(tmp_path: Path) -> None:
    out = _output(tmp_path, "s1/x.tif", "1234")
    manifest = Manifest(tmp_path)
    manifest.record("s1", "e", "s", [out])
    path = tmp_path / MANIFEST_NAME
    with open(path, "ab") as handle:  # what a writer killed mid-line leaves behind
        handle.write(b'{"v": 1, "scene": "s2", "expressions": "e", "outp')
    reader = Manifest(tmp_path)
    assert [e.scene for e in reader.entries()] == ["s1"] and reader.ignored_lines == 0
    out2 = _output(tmp_path, "s3/y.tif", "abc")
    manifest.record("s3", "e", "s", [out2])
    assert path.read_bytes().count(b"\n") == 3  # the torn line was ended before the new line
    assert [e.scene for e in reader.entries()] == ["s1", "s3"] and reader.ignored_lines == 1  # incremental
    hostile = [
        {"v": 1, "scene": "h1", "expressions": "e", "settings": "s", "outputs": [{"path": "/etc/passwd", "bytes": 1}]},
        {"v": 1, "scene": "h2", "expressions": "e", "settings": "s", "outputs": [{"path": "../x", "bytes": 1}]},
    ]
    with open(path, "ab") as handle:
        handle.write(b"[1, 2]\n\xff\xfe not json\n" + b"".join(json.dumps(h).encode() + b"\n" for h in hostile))
    fresh = Manifest(tmp_path)
    assert fresh.is_done("s1", "e", "s") and fresh.is_done("s3", "e", "s")
    assert not fresh.is_done("h1", "e", "s") and not fresh.is_done("h2", "e", "s")
    assert fresh.ignored_lines == 3


def _append_many(folder: str, worker: int, count: int, barrier: Any) -> None:
    manifest = Manifest(folder)
    outputs = []
    for i in range(count):
        outputs.append(_output(Path(folder), f"w{worker}/s{i}.txt", "x" * (i + 1)))
    barrier.wait()
    for i, out in enumerate(outputs):
        manifest.record(f"w{worker}-s{i}", "e", "s", [out], info={"pad": "y" * 5000})  # long lines


def test_two_processes_append_concurrently(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 150, barrier)) for w in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    lines = (tmp_path / MANIFEST_NAME).read_bytes().splitlines()
    assert len(lines) == 300 and all(json.loads(line)["v"] == 1 for line in lines)  # none interleaved
    manifest = Manifest(tmp_path)
    assert len(manifest.entries()) == 300 and manifest.ignored_lines == 0
    assert all(manifest.is_done(f"w{w}-s{i}", "e", "s") for w in range(2) for i in range(150))


_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from rsrefseg.inference.manifest import Manifest

    folder = Path(sys.argv[1])
    manifest = Manifest(folder)
    out = folder / "out.txt"
    out.write_text("x")
    print("ready", flush=True)
    i = 0
    while True:
        manifest.record(f"scene-{i}", "e", "s", [out], info={"pad": "y" * 200000})
        i += 1
    """
)


@pytest.mark.parametrize("delay", [0.3, 0.7])
def test_writer_killed_with_sigkill_leaves_a_consistent_manifest(tmp_path: Path, delay: float) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    manifest = Manifest(tmp_path)
    done = [e.scene for e in manifest.entries()]
    assert done == [f"scene-{i}" for i in range(len(done))] and done  # complete lines, in order
    assert manifest.ignored_lines == 0
    manifest.record("after", "e", "s", [tmp_path / "out.txt"])
    again = Manifest(tmp_path)
    assert [e.scene for e in again.entries()] == [*done, "after"]
    assert again.ignored_lines <= 1  # the torn line, if the kill hit one


def test_remove_temporaries_only_touches_atomic_write_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".a.mask.tif.k2j3.tmp").write_bytes(b"partial")
    (tmp_path / ".v.gpkg.x81.tmp").mkdir()
    (tmp_path / ".v.gpkg.x81.tmp" / "v.gpkg").write_bytes(b"partial")
    (tmp_path / "01_lake.mask.tif").write_bytes(b"done")
    (tmp_path / ".hidden").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_bytes(b"keep")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".a.mask.tif.k2j3.tmp", ".v.gpkg.x81.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "01_lake.mask.tif", "notes.tmp"]
    assert remove_temporaries(tmp_path / "missing") == []


def test_appends_wait_for_the_lock_held_by_another_process(tmp_path: Path) -> None:
    import fcntl

    out = _output(tmp_path, "s/x.txt", "x")
    ctx = multiprocessing.get_context("fork")
    with open(tmp_path / "manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # e.g. another node appending
        writer = ctx.Process(target=Manifest(tmp_path).record, args=("s", "e", "s", [out]))
        writer.start()
        writer.join(1.0)
        assert writer.is_alive() and not (tmp_path / MANIFEST_NAME).exists()  # blocked on the lock
        fcntl.flock(lock, fcntl.LOCK_UN)
    writer.join(30)
    assert writer.exitcode == 0 and Manifest(tmp_path).is_done("s", "e", "s")
