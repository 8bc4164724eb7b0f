"""The web demo's rows of the bad-input table, at the DemoService level (what ``rsrefseg serve`` shows).

Each row: the run (and the upload) is refused with a one-line message that names the file (or the
expression / the band text) and the problem, no traceback text reaches the page, nothing is left
in the output folder, and the service keeps serving (a good run afterwards works).
The same files go through the real HTTP server in ``tests/test_serve_http.py``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rsrefseg.demo_service import DemoService, Limits
from rsrefseg.errors import RSRefSegError
from tests.test_demo_service import _geotiff, _png, tiny_predictor

LIMITS = Limits(max_upload_mb=5, max_pixels=200 * 200, max_expressions=4)


# ---------------------------------------------------------------- bad files (shared with test_serve_http)
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` and whose data is one tiny compressed block: a
    decompression bomb / huge header of a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def zeros_png(path: Path, side: int) -> Path:
    """A real ``side x side`` black PNG (compresses about 1000:1: a classic decompression bomb)."""
    from PIL import Image

    Image.new("L", (side, side)).save(path, optimize=True)
    return path


def huge_geotiff(path: Path, side: int = 50_000) -> Path:
    """A sparse tiled GeoTIFF of ``side x side`` pixels that is a few hundred KB on disk."""
    import rasterio
    from affine import Affine

    profile = {"driver": "GTiff", "height": side, "width": side, "count": 1, "dtype": "uint8", "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "sparse_ok": True,
               "crs": "EPSG:32631", "transform": Affine(1.0, 0, 500000.0, 0, -1.0, 4500000.0)}
    with rasterio.open(path, "w", **profile):
        pass
    return path


def two_band_geotiff(path: Path) -> Path:
    import rasterio

    data = np.random.default_rng(0).integers(0, 255, size=(2, 32, 32), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", height=32, width=32, count=2, dtype="uint8") as dst:
        dst.write(data)
    return path


def truncated(source: Path, path: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def jpeg(path: Path, height: int = 64, width: int = 64) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(
        path, quality=90)
    return path


def jpeg_with_huge_header(path: Path) -> Path:
    """A small JPEG whose frame header (SOF0) claims 60000 x 60000 pixels."""
    data = bytearray(jpeg(path).read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    path.write_bytes(bytes(data))
    return path


#: (row id, file builder (tmp folder -> path), expressions, bands, expected message pieces).
#: The message must contain every piece; ``{name}`` is the file's name.
ROWS: list[tuple[str, Callable[[Path], Path], str, str | None, list[str]]] = [
    ("zero-byte png", lambda d: (d / "empty.png", (d / "empty.png").write_bytes(b""))[0], "the ship", None,
     ["empty.png: cannot read image"]),
    ("zero-byte tif", lambda d: (d / "empty.tif", (d / "empty.tif").write_bytes(b""))[0], "the ship", None,
     ["empty.tif: cannot read image"]),
    ("corrupt png", lambda d: (d / "junk.png", (d / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 50))[0],
     "the ship", None, ["junk.png: cannot read image"]),
    ("text as tif", lambda d: (d / "notes.tif", (d / "notes.tif").write_text("hello"))[0], "the ship", None,
     ["notes.tif: cannot read image"]),
    ("truncated png", lambda d: truncated(_png(d / "full.png", 120, 120), d / "cut.png"), "the ship", None,
     ["cut.png: cannot read image", "truncated"]),
    ("truncated jpeg", lambda d: truncated(jpeg(d / "full.jpg", 120, 120), d / "cut.jpg", 0.3), "the ship", None,
     ["cut.jpg: cannot read image"]),
    ("truncated geotiff", lambda d: truncated(_geotiff(d / "full.tif", 120, 120), d / "cut.tif", 0.4), "the ship",
     None, ["cut.tif: cannot read image"]),
    ("two bands", lambda d: two_band_geotiff(d / "two.tif"), "the ship", None, ["two.tif: unsupported band count 2"]),
    ("bands out of range", lambda d: _geotiff(d / "rgb.tif"), "the ship", "4,3,2",
     ["rgb.tif: unsupported band count", "out of range for 3 band(s)"]),
    ("bands not numbers", lambda d: _png(d / "ok.png", 32, 32), "the ship", "red,green", ["bands must be 1-based"]),
    ("bands: two of them", lambda d: _png(d / "ok.png", 32, 32), "the ship", "1,2", ["must name 1 or 3 bands"]),
    ("bands: megabyte", lambda d: _png(d / "ok.png", 32, 32), "the ship", "1," * 500_000,
     ["bands: 1000000 characters"]),
    ("png header 30000 x 30000", lambda d: png_header_only(d / "bomb.png", 30_000, 30_000), "the ship", None,
     ["bomb.png: cannot read image", "decompression bomb"]),
    ("png header 10000 x 10000", lambda d: png_header_only(d / "big.png", 10_000, 10_000), "the ship", None,
     ["big.png: image is 10000 x 10000 = 100 MP, above the limit of 0.04 MP"]),
    ("png 2000 x 2000 zeros", lambda d: zeros_png(d / "zeros.png", 2000), "the ship", None,
     ["zeros.png: image is 2000 x 2000 = 4 MP, above the limit"]),
    ("jpeg header 60000 x 60000", lambda d: jpeg_with_huge_header(d / "huge.jpg"), "the ship", None,
     ["huge.jpg: cannot read image", "decompression bomb"]),
    ("geotiff 50000 x 50000", lambda d: huge_geotiff(d / "scene.tif"), "the ship", None,
     ["scene.tif: image is 50000 x 50000 = 2,500 MP, above the limit of 0.04 MP"]),
    ("empty expressions", lambda d: _png(d / "ok.png", 32, 32), "", None, ["type at least one referring expression"]),
    ("whitespace expressions", lambda d: _png(d / "ok.png", 32, 32), " \n\t\n  ", None,
     ["type at least one referring expression"]),
    ("too many expressions", lambda d: _png(d / "ok.png", 32, 32), "a\nb\nc\nd\ne", None,
     ["5 expressions given; at most 4"]),
    ("1001 characters", lambda d: _png(d / "ok.png", 32, 32), "x" * 1001, None,
     ["expression 1 has 1001 characters; at most 1000"]),
    ("10 MB paste", lambda d: _png(d / "ok.png", 32, 32), "the ship " * (10 * 2**20 // 9), None,
     [f"the expressions are {9 * (10 * 2**20 // 9)} characters long; at most 4004 are accepted"]),
    ("lone surrogate", lambda d: _png(d / "ok.png", 32, 32), "the ship\nthe r\ud800ad", None,
     ["expression 2 is not valid text (character 6 is a lone surrogate U+D800"]),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> DemoService:
    return DemoService(tiny_predictor(), LIMITS, workdir=tmp_path_factory.mktemp("work"))


@pytest.mark.parametrize(("builder", "text", "bands", "pieces"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_rows(service: DemoService, tmp_path: Path, builder: Callable[[Path], Path], text: str,
                        bands: str | None, pieces: list[str]) -> None:
    path = builder(tmp_path)
    out = tmp_path / "out"
    messages = []
    calls: list[Callable[[], Any]] = [lambda: service.run(path, text, 0.5, bands, out_dir=out)]
    if text == "the ship":  # the file itself is bad: the upload is refused too
        calls.append(lambda: service.load(path, bands))
    for call in calls:
        with pytest.raises(RSRefSegError) as info:
            call()
        messages.append(str(info.value))
    for message in messages:
        assert all(piece in message for piece in pieces), message
        assert "\n" not in message and "Traceback" not in message and str(tmp_path) not in message, message
        assert len(message) < 600
    assert not out.exists() or not any(out.iterdir())  # no partial outputs
    assert service._lock.acquire(blocking=False)  # not left locked: the next request can run
    service._lock.release()


def test_still_serving_after_the_bad_inputs(service: DemoService, tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png", 40, 40)
    assert service.run(good, "the ship", out_dir=tmp_path / "good").records


def test_a_failing_run_leaves_no_partial_outputs(service: DemoService, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A write error in the middle of a run (after one expression's files are written) removes the
    run's folder; the error reaches the caller."""
    import rsrefseg.inference.outputs as outputs

    original = outputs.write_prediction_outputs
    calls: list[int] = []

    def fail_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(outputs, "write_prediction_outputs", fail_second)
    with pytest.raises(OSError, match="No space left"):
        service.run(_png(tmp_path / "a.png", 32, 32), "the ship\nthe road", out_dir=tmp_path / "out")
    assert len(calls) == 2 and list((tmp_path / "out").iterdir()) == []


def test_messages_name_the_file_not_the_server_path(service: DemoService, tmp_path: Path) -> None:
    deep = tmp_path / "server" / "0123abcd"
    deep.mkdir(parents=True)
    junk = deep / "photo.png"
    junk.write_bytes(b"not a png")
    for call in (lambda: service.load(junk), lambda: service.run(junk, "the ship")):
        with pytest.raises(RSRefSegError) as info:
            call()
        message = str(info.value)
        assert message.startswith("photo.png: cannot read image") and "0123abcd" not in message, message
