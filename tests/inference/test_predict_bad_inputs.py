"""``rsrefseg predict``'s rows of the bad-input table: one ``error:`` line naming the file, the exit
status, no traceback, no partial file, bounded memory."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from rsrefseg.cli.main import main


def huge_header_tiff(path: Path, side: int = 1_000_000) -> Path:
    """A 148-byte TIFF whose header claims ``side x side`` uint8 pixels (one DEFLATE strip)."""
    data = zlib.compress(b"\0" * 4096)
    tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, side), (279, 4, len(data))]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)))
    for tag, kind, value in tags:
        value = data_offset if tag == 273 else value
        out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0))
    path.write_bytes(bytes(out + struct.pack("<I", 0) + data))
    return path


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A ~100 KB 1-bit PNG of ``side x side`` pixels (a decompression bomb for readers that expand it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def bad_images(tmp_path: Path, make_geotiff) -> dict[str, Path]:
    """Every kind of broken image, by row name."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = make_geotiff(folder / "good.tif", height=60, width=90, bands=3, nodata_cols=0)
    data = good.read_bytes()
    images = {"corrupt": folder / "corrupt.tif", "truncated": folder / "truncated.tif",
              "zero-byte tif": folder / "empty.tif", "zero-byte png": folder / "empty.png",
              "not a jpeg": folder / "text.jpg"}
    images["corrupt"].write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    images["truncated"].write_bytes(data[: len(data) // 2])
    images["zero-byte tif"].write_bytes(b"")
    images["zero-byte png"].write_bytes(b"")
    images["not a jpeg"].write_text("just some text\n")
    images["two bands"] = make_geotiff(folder / "two_band.tif", bands=2)
    images["huge header"] = huge_header_tiff(folder / "huge_header.tif")
    images["decompression bomb"] = bomb_png(folder / "bomb.png")
    return images


# row -> what the one error line says after the file name
IMAGE_ROWS = {
    "corrupt": "cannot",
    "truncated": "cannot read image",
    "zero-byte tif": "cannot",
    "zero-byte png": "cannot read image",
    "not a jpeg": "cannot read image",
    "two bands": "unsupported band count 2",
    "huge header": "not enough free disk space",
    "decompression bomb": "decompression bomb",
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["predict", *argv, "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("row", list(IMAGE_ROWS))
def test_bad_image_rows(row, bad_images, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    path = bad_images[row]
    code, lines = _run(capsys, str(path), "--text", "a road", "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    assert code == 2 and len(lines) == 1  # the image's error (the run's report goes to stdout)
    error = lines[0]
    assert error.startswith(f"error: {path}: ") and IMAGE_ROWS[row] in error
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == [] and summary["failures"][0]["error"] == error[len("error: "):]
    assert _files(out) == ["summary.json"]  # no partial file, no temporary


def test_max_pixels_refuses_larger_images_only(make_geotiff, tiny_checkpoint, tmp_path, capsys):
    small = make_geotiff(tmp_path / "small.tif", height=40, width=50, nodata_cols=0)
    large = make_geotiff(tmp_path / "large.tif", height=80, width=100, nodata_cols=0)
    code, lines = _run(capsys, str(small), str(large), "--text", "x", "--checkpoint", str(tiny_checkpoint),
                       "--out", str(tmp_path / "out"), "--max-pixels", "60x60")
    assert code == 1 and lines == [f"error: {large}: 100 x 80 = 8,000 pixels exceeds --max-pixels 3,600"]
    assert not (tmp_path / "out" / "large").exists()


ARGUMENT_ROWS = [
    ("empty expression", ["--text", ""], "--text #1 is empty"),
    ("whitespace expression", ["--text", " \t "], "--text #1 is empty"),
    ("very long expression", ["--text", "x" * 5000], "--text #1 has 5000 characters; at most 1000"),
    ("non-UTF-8 texts file", ["--texts-file", "{bytes}"], "{bytes}: the texts file is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("texts file is a folder", ["--texts-file", "{folder}"], "{folder}: cannot read the texts file"),
    ("missing image", ["{missing}"], "{missing}: no such image file or folder"),
    ("missing path list", ["@{missing}"], "{missing}"),
    ("no input at all", ["--inputs-file", "{empty_list}"], "{empty_list}: the path list names no input"),
    ("--out is a file", ["--out", "{bytes}"], "{bytes}: --out exists and is not a folder"),
    ("--out under a file", ["--out", "{bytes}/sub"], "{bytes}/sub: cannot create the output folder"),
    ("--out not writable", ["--out", "/sys/rsrefseg-predict-test"], "/sys/rsrefseg-predict-test: cannot create"),
    ("unknown --merge format", ["--merge", "{tmp}/all.kml"], "kml"),
    ("bad --merge-crs", ["--merge", "{tmp}/all.gpkg", "--merge-crs", "EPSG:0"], "--merge-crs 'EPSG:0' is not a CRS"),
    ("missing checkpoint", ["--checkpoint", "{missing}"], "{missing}"),
    ("checkpoint config not JSON", ["--checkpoint", "{broken_config}"], "{broken_config}/config.json"),
    ("checkpoint weights truncated", ["--checkpoint", "{broken_weights}"], "{broken_weights}/model.safetensors"),
]


@pytest.mark.parametrize(("row", "extra", "message"), ARGUMENT_ROWS, ids=[r[0] for r in ARGUMENT_ROWS])
def test_bad_argument_rows_stop_before_any_work(row, extra, message, nodata_tif, tiny_checkpoint, tmp_path, capsys):
    paths = {"bytes": tmp_path / "latin1.txt", "folder": tmp_path / "a-folder", "missing": tmp_path / "missing",
             "empty_list": tmp_path / "empty-list.txt", "tmp": tmp_path,
             "broken_config": tmp_path / "ckpt-config", "broken_weights": tmp_path / "ckpt-weights"}
    paths["bytes"].write_bytes("caf\xe9 on the left\n".encode("latin-1") + b"\xff")
    paths["folder"].mkdir()
    paths["empty_list"].write_text("# nothing\n\n")
    shutil.copytree(tiny_checkpoint, paths["broken_config"])
    (paths["broken_config"] / "config.json").write_text("{not json")
    shutil.copytree(tiny_checkpoint, paths["broken_weights"])
    weights = paths["broken_weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = [a.format(**paths) for a in extra]
    if not any(a.startswith("@") or a == "--inputs-file" for a in argv) and row != "missing image":
        argv = [str(nodata_tif), *argv]
    if "--text" not in argv and "--texts-file" not in argv:
        argv += ["--text", "the road"]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", str(tiny_checkpoint)]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code, lines = _run(capsys, *argv)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message.format(**paths) in lines[0], lines[0]
    assert not out.exists()  # nothing created before the inputs (checkpoint included) are valid


def test_bad_images_in_one_run_keep_memory_bounded(bad_images, make_geotiff, tiny_checkpoint, tmp_path):
    """Every bad image and one good one in one process: the good one is written, memory stays near
    the model's (the 10^12-pixel header and the 900-Mpx PNG are refused from their headers)."""
    good = make_geotiff(tmp_path / "fine.tif", height=50, width=70, nodata_cols=0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rsrefseg", "predict", *map(str, bad_images.values()), str(good), "--text", "x",
           "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == len(bad_images) and all(line.startswith("error: ") for line in errors)
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(i["source"]).name for i in summary["images"]] == ["fine.tif"]
    assert summary["peak_rss_mb"] - summary["rss_after_model_mb"] < 150
    assert all(name.startswith(("summary.json", "fine/", "manifest.")) for name in _files(out))
