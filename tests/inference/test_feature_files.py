"""Window files and index checks of feature folders, on hand-made (also hostile) files; no model needed."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rsrefseg.errors import DataError
from rsrefseg.inference import feature_files as ff
from rsrefseg.inference import feature_index as fi
from rsrefseg.inference.tiling import tile_grid

SHAPES = {"sam": (1, 8, 4, 4), "clip": (1, 6, 2, 2)}
BOX = (0, 0, 5, 7)
KEY = "k" * 32


def _expected(dtype: str = "float32") -> dict:
    return ff.expected_window(SHAPES, dtype, BOX)


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    valid = np.random.default_rng(seed).random((5, 7)) > 0.3
    return torch.randn(SHAPES["sam"], generator=g), torch.randn(SHAPES["clip"], generator=g), valid


def _write(path: Path, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    sam, clip, valid = _features()
    ff.write_window(path, sam, clip, valid, dtype, KEY, BOX)
    return sam, clip, valid


def _raw_file(path: Path, header: dict | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_window_round_trip_float32_and_layout(tmp_path: Path) -> None:
    sam, clip, valid = _features()
    clip_cl = clip.contiguous(memory_format=torch.channels_last)  # as the encoders produce it
    ff.write_window(tmp_path / "w.safetensors", sam, clip_cl, valid, "float32", KEY, BOX)
    got_sam, got_clip, got_valid = ff.read_window(tmp_path / "w.safetensors", _expected(), KEY, BOX)
    assert torch.equal(got_sam, sam) and torch.equal(got_clip, clip)
    assert got_sam.is_contiguous() and got_clip.stride() == clip_cl.stride()  # layout restored
    np.testing.assert_array_equal(got_valid, valid)


def test_window_round_trip_float16(tmp_path: Path) -> None:
    sam, clip, _ = _write(tmp_path / "w.safetensors", "float16")
    got_sam, got_clip, _ = ff.read_window(tmp_path / "w.safetensors", _expected("float16"), KEY, BOX)
    assert got_sam.dtype == torch.float16 and torch.equal(got_sam, sam.half()) and torch.equal(got_clip, clip.half())
    with pytest.raises(DataError, match="not made for this model"):  # the folder says float32, the file is float16
        ff.read_window(tmp_path / "w.safetensors", _expected("float32"), KEY, BOX)


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    sam, clip, valid = _features()
    sam[0, 0, 0, 0] = 1e6
    with pytest.raises(DataError, match="not finite in float16"):
        ff.write_window(tmp_path / "w.safetensors", sam, clip, valid, "float16", KEY, BOX)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key": "x" * 32}, "another feature folder"),
        ({"box": (0, 0, 5, 8)}, "holds window"),
    ],
)
def test_window_from_another_folder_or_box_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    sam, clip, valid = _features()
    ff.write_window(tmp_path / "w.safetensors", sam, clip, valid, "float32", change.get("key", KEY),
                    change.get("box", BOX))
    with pytest.raises(DataError, match=message):
        ff.read_window(tmp_path / "w.safetensors", _expected(), KEY, BOX)


def test_hostile_window_files_are_refused_before_allocating(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _write(good)
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    cases: dict[str, tuple[bytes, str]] = {
        "truncated": (raw[:-10], "has .* bytes, expected"),
        "empty": (b"", "truncated window file"),
        "huge header length": (struct.pack("<Q", 2**62) + raw[8:], "header of"),
        "header not json": (struct.pack("<Q", length) + b"{" * length + data, "not JSON"),
        "header a list": (None, "not an object"),
        "appended bytes": (raw + b"\0" * 16, "has .* bytes, expected"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if content is None:
            _raw_file(path, b"[" + b" " * (length - 2) + b"]", data)
        else:
            path.write_bytes(content)
        with pytest.raises(DataError, match=message):
            ff.read_window(path, _expected(), KEY, BOX)
    # A header announcing huge shapes: refused from the header (shape check), nothing allocated.
    big = dict(header)
    big["sam"] = {**header["sam"], "shape": [1, 8, 100000, 100000]}
    with pytest.raises(DataError, match="expected F32 \\[1, 8, 4, 4\\]"):
        ff.read_window(_raw_file(tmp_path / "big.safetensors", big, data), _expected(), KEY, BOX)
    # Shifted offsets: the tensors no longer tile the data block (a gap, then an overlap).
    overlap = json.loads(json.dumps(header))
    overlap["clip"]["data_offsets"] = [v + 4 for v in header["clip"]["data_offsets"]]
    with pytest.raises(DataError, match="overlap or leave gaps"):
        ff.read_window(_raw_file(tmp_path / "overlap.safetensors", overlap, data), _expected(), KEY, BOX)
    # An extra tensor, a wrong format, an unknown layout.
    extra = {**header, "more": header["valid"]}
    with pytest.raises(DataError, match="has tensors"):
        ff.read_window(_raw_file(tmp_path / "extra.safetensors", extra, data), _expected(), KEY, BOX)
    for meta, message in (({"format": "other"}, "not a rsrefseg-features-v1"),
                          ({"sam_layout": "strided"}, "memory layout")):
        bad = {**header, "__metadata__": {**header["__metadata__"], **meta}}
        padded = json.dumps(bad).encode()
        with pytest.raises(DataError, match=message):
            ff.read_window(_raw_file(tmp_path / "meta.safetensors", padded, data), _expected(), KEY, BOX)


def test_nan_features_are_refused(tmp_path: Path) -> None:
    sam, clip, valid = _features()
    sam[0, 1, 2, 3] = float("nan")
    tensors = {"sam": sam, "clip": clip, "valid": ff.pack_valid(valid)}
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path), metadata={"format": ff.FORMAT, "key": KEY, "box": "0,0,5,7",
                                            "sam_layout": "contiguous", "clip_layout": "contiguous"})
    with pytest.raises(DataError, match="NaN or infinite"):
        ff.read_window(path, _expected(), KEY, BOX)


def test_missing_window_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        ff.read_window(tmp_path / "w000001.safetensors", _expected(), KEY, BOX)


def test_count_windows_matches_tile_grid() -> None:
    for h, w, tile, overlap in [(1, 1, 16, 0), (100, 300, 64, 8), (2846, 4627, 256, 32), (513, 512, 256, 255)]:
        assert ff.count_windows(h, w, tile, overlap) == len(tile_grid(h, w, tile, overlap))


def _index(height: int = 50, width: int = 70, tile: int = 32, overlap: int = 4) -> dict:
    boxes = tile_grid(height, width, tile, overlap)
    return {"format": ff.FORMAT, "complete": True, "key": KEY,
            "scene": {"path": "/x.tif", "name": "x.tif", "height": height, "width": width, "file_size": None,
                      "file_mtime_ns": None},
            "tiling": {"tile": tile, "overlap": overlap}, "windows": [[*b, 1] for b in boxes], "dtype": "float32",
            "model": {"fingerprint": "f", "precision": "fp32"}, "checkpoint": None, "bands": None,
            "band_indices": [1, 2, 3], "stretch": None, "preview": {"height": 10, "width": 14},
            "georef": {"crs_wkt": None, "transform": [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]}}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ix: ix.update(complete=False), "incomplete feature folder"),
        (lambda ix: ix["scene"].update(height=10**6, width=10**6), "above the limit"),
        (lambda ix: ix["scene"].update(height="50"), "scene.height"),
        (lambda ix: ix["scene"].update(height=True), "scene.height"),
        (lambda ix: ix["tiling"].update(tile=10**9), "tile"),
        (lambda ix: ix["tiling"].update(overlap=32), "overlap"),
        (lambda ix: ix["windows"].pop(), "windows listed"),
        (lambda ix: ix["windows"][0].__setitem__(0, 3), "is not window"),
        (lambda ix: ix["windows"][0].__setitem__(4, 2), "is not window"),
        (lambda ix: ix["windows"].__setitem__(1, "w"), "list of integers"),
        (lambda ix: ix.update(dtype="float64"), "feature dtype"),
        (lambda ix: ix.update(band_indices=[0, 1, 2]), "band_indices"),
        (lambda ix: ix["preview"].update(height=10**9), "preview.height"),
        (lambda ix: ix["preview"].update(width=4097), "preview.width"),
        (lambda ix: ix["scene"].update(path="/" + "a" * 5000), "scene.path"),
        (lambda ix: ix["scene"].update(path="/a\0b"), "scene.path"),
        (lambda ix: ix["scene"].update(path=""), "scene.path"),
        (lambda ix: ix["georef"].update(transform=[1, 0, 0, 0, "x", 0]), "6 finite numbers"),
        (lambda ix: ix["georef"].update(transform=[1, 0, float("inf"), 0, 1, 0]), "6 finite numbers"),
        (lambda ix: ix["georef"].update(crs_wkt="not a crs"), "not a CRS"),
        (lambda ix: ix.pop("model"), "model.fingerprint"),
    ],
)
def test_bad_index_fields_are_refused(tmp_path: Path, mutate, message: str) -> None:
    index = _index()
    mutate(index)
    with pytest.raises(DataError, match=message):
        fi.check_index(tmp_path, index, max_pixels=10**8)


def test_good_index_passes_and_gives_georef(tmp_path: Path) -> None:
    _, georef = fi.check_index(tmp_path, _index(), max_pixels=10**8)
    assert georef.crs is None and georef.transform.e == -1.0 and georef.shape == (50, 70)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not a feature folder"), (b"{not json", "corrupt index"), (b"[1, 2]", "not a rsrefseg-features-v1"),
     (b'{"format": "other"}', "format 'other'"), (b"\xff\xfe", "corrupt index"), (b"[" * 100000, "corrupt index")],
)
def test_unreadable_index_is_refused(tmp_path: Path, content: bytes | None, message: str) -> None:
    if content is not None:
        (tmp_path / ff.INDEX_NAME).write_bytes(content)
    with pytest.raises(DataError, match=message):
        fi.read_index_json(tmp_path)


def test_oversized_index_is_refused_without_reading_it_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fi, "MAX_INDEX_BYTES", 100)
    (tmp_path / ff.INDEX_NAME).write_text(json.dumps({"format": ff.FORMAT, "pad": "x" * 200}))
    with pytest.raises(DataError, match="index larger than"):
        fi.read_index_json(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_fifo_in_place_of_the_index_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / ff.INDEX_NAME)  # opened for reading, a FIFO would wait for a writer forever
    with pytest.raises(DataError, match=r"index\.json: not a regular file"):
        fi.read_index_json(tmp_path)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / ff.INDEX_NAME).mkdir()  # a folder named index.json
    with pytest.raises(DataError, match=r"index\.json: (not a regular file|cannot read)"):
        fi.read_index_json(tmp_path / "dir")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="feature folder not found"):
        fi.read_index_json(tmp_path / "nope")


def test_cli_dtype_names_match_the_library() -> None:
    from rsrefseg.cli.encode_cli import DTYPE_NAMES

    assert DTYPE_NAMES == tuple(ff.FEATURE_DTYPES)


def test_full_disk_while_writing_a_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import safetensors.torch

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(DataError, match="cannot write the window file \\(No space left on device\\)"):
        _write(tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())  # neither the window nor the temporary file
