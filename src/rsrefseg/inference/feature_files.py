"""The on-disk format of feature folders (``rsrefseg-features-v1``): index, window files, checks.

A feature folder holds the encoded windows of one scene (see :mod:`rsrefseg.inference.features`)::

    index.json                      settings and the window list (JSON)
    preview.png                     RGBA preview of the scene (alpha 255 = valid pixel)
    windows/w000000.safetensors     one file per window with at least one valid pixel

A window file is a safetensors file with exactly three tensors and three metadata strings:

- ``sam``: ``1 x C x g x g`` SAM image embeddings (``float32`` or ``float16``);
- ``clip``: ``1 x D x h x w`` CLIP/SigLIP patch features (same dtype);
- ``valid``: ``ceil(H_w * W_w / 8)`` uint8, the window's ``H_w x W_w`` validity bit-packed in
  row-major order (:func:`numpy.packbits`);
- metadata ``format``, ``key`` (the folder's settings hash, :func:`settings_key`) and ``box``
  (``"y0,x0,y1,x1"``), so that a window file copied from another folder or window is refused.

Window file names are derived from the window number (never read from the index), so an index
cannot point outside its folder. Nothing here unpickles: JSON and safetensors only. Every size is
checked before anything is allocated: ``index.json`` is read only up to :data:`MAX_INDEX_BYTES`; a
window file must have exactly the size its header announces, with a header of at most
:data:`MAX_HEADER_BYTES`, the three expected tensors with the shapes the **model** expects (not
the shapes the index claims) and finite values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsrefseg.errors import DataError, OutputError, WeightsError
from rsrefseg.utils import atomic_path

#: Format name written into ``index.json`` and every window file.
FORMAT = "rsrefseg-features-v1"
INDEX_NAME = "index.json"
PREVIEW_NAME = "preview.png"
WINDOWS_DIR = "windows"
#: Largest ``index.json`` read (bytes); a 100 000-window scene needs about 3 MB.
MAX_INDEX_BYTES = 64 * 2**20
#: Largest safetensors header of a window file (bytes); a real one has about 400.
MAX_HEADER_BYTES = 64 * 2**10
#: Largest window side (pixels): decoding holds ``4 * tile**2`` bytes of logits per expression of a batch.
MAX_TILE = 8192
#: Largest side of the stored preview (pixels; 4096 x 4096 RGBA is 64 MB decoded).
MAX_PREVIEW_SIDE = 4096
#: Longest scene path recorded in an index (characters).
MAX_PATH_CHARS = 4096
#: Most windows accepted from an index.
MAX_WINDOWS = 1_000_000
#: Feature dtypes on disk: name -> (safetensors dtype, torch dtype).
FEATURE_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "float32": ("F32", torch.float32),
    "float16": ("F16", torch.float16),
}
_ITEM_BYTES = {"F32": 4, "F16": 2, "U8": 1}
#: Modules of the model whose parameters identify a checkpoint (the trained head; never changed by
#: ``optimize_for_inference``, whatever the precision).
_HEAD_PREFIXES = ("prompter.", "sam.prompt_encoder.", "sam.mask_decoder.", "sam.shared_image_embedding.",
                  "activation.")
_checkpoint_hashes: dict[tuple[str, int, int, int, int], str] = {}


def window_name(number: int) -> str:
    """File name of window ``number`` (0-based, row-major) inside ``windows/``."""
    return f"w{number:06d}.safetensors"


def count_windows(height: int, width: int, tile: int, overlap: int) -> int:
    """Number of windows :func:`rsrefseg.inference.tiling.tile_grid` makes, without listing them."""
    stride = tile - overlap

    def along(size: int) -> int:
        return 1 if size <= tile else math.ceil((size - tile) / stride) + 1

    return along(height) * along(width)


# ---------------------------------------------------------------------------------------- fingerprints
def checkpoint_fingerprint(directory: str | os.PathLike[str]) -> str:
    """SHA-256 of a checkpoint's ``config.json`` and ``model.safetensors`` (names and bytes).

    The full files are hashed (about 0.1 s for a 66 MB checkpoint); the result is cached in this
    process by path, size and modification time.

    Raises:
        WeightsError: a file is missing or unreadable.
    """
    from rsrefseg.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(directory)
    files = [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
    try:
        stats = [f.stat() for f in files]
    except OSError:
        raise WeightsError(f"{folder}: not a checkpoint directory ({CONFIG_NAME} and {WEIGHTS_NAME} needed)") from None
    cache_key = (str(folder.resolve()), stats[0].st_size, stats[0].st_mtime_ns, stats[1].st_size, stats[1].st_mtime_ns)
    if cache_key in _checkpoint_hashes:
        return _checkpoint_hashes[cache_key]
    digest = hashlib.sha256()
    try:
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with open(file, "rb") as handle:
                while chunk := handle.read(2**20):
                    digest.update(chunk)
    except OSError as exc:
        raise WeightsError(f"{folder}: cannot read the checkpoint ({exc.strerror or exc})") from None
    _checkpoint_hashes[cache_key] = digest.hexdigest()
    return _checkpoint_hashes[cache_key]


def model_fingerprint(model: Any) -> str:
    """SHA-256 of a model's config and its trained head (prompter, SAM prompt encoder and mask
    decoder, CLIP logit scale/bias): equal for every load of one checkpoint, at any precision, on
    any device, and different for any two trainings (the head is always trained). Loading one
    checkpoint with other base weights (``clip=``/``sam=``) changes the config and so the fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(n for n in tensors if n.startswith(_HEAD_PREFIXES)):
        value = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)}\0".encode())
        digest.update(value.numpy().tobytes())
    for value in model.clip.scale_and_bias():
        digest.update(value.detach().to("cpu", torch.float32).reshape(-1).numpy().tobytes())
    return digest.hexdigest()


def model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Shapes of one window's features for ``model``: ``sam`` ``(1, C, g, g)``, ``clip`` ``(1, D, h, w)``."""
    g = int(model.embed_grid)
    grid = int(model.clip.grid)
    return {"sam": (1, int(model.sam.config.vision_config.output_channels), g, g),
            "clip": (1, int(model.clip.embed_dim), grid, grid)}


def model_precision(model: Any) -> str:
    """``"bf16"`` when the SAM image encoder runs in bfloat16 (``optimize_for_inference``), else ``"fp32"``."""
    dtype = next(model.sam.vision_encoder.parameters()).dtype
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def settings_key(settings: dict[str, Any]) -> str:
    """Hash of everything that determines the windows' content (model, precision, scene file,
    tiling, bands, stretch, dtype); stored in the index and in every window file."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------- window files
def pack_valid(valid: np.ndarray) -> torch.Tensor:
    """``h x w`` bool -> ``ceil(h * w / 8)`` uint8 (bits in row-major order)."""
    return torch.from_numpy(np.packbits(np.ascontiguousarray(valid, dtype=bool).reshape(-1)))


def unpack_valid(packed: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_valid`: ``h x w`` bool."""
    bits = np.unpackbits(packed.numpy(), count=height * width)  # h*w uint8 0/1
    return bits.reshape(height, width).astype(bool)  # h*w -> h x w (row-major)


def _box_text(box: tuple[int, int, int, int]) -> str:
    return ",".join(str(int(v)) for v in box)


#: Memory layouts of a 4-D feature tensor recorded in window files.
LAYOUTS = ("contiguous", "channels_last")


def _layout(tensor: torch.Tensor) -> str:
    """``"channels_last"`` for a ``B x C x H x W`` tensor stored as ``B x H x W x C``, else ``"contiguous"``."""
    if not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


def write_window(path: Path, sam: torch.Tensor, clip: torch.Tensor, valid: np.ndarray, dtype: str,
                 key: str, box: tuple[int, int, int, int]) -> int:
    """Write one window file atomically (temporary file, then rename); returns its size in bytes.

    Raises:
        DataError: a feature value is not finite in ``dtype`` (float16 overflows above 65504), or
            the file cannot be written.
    """
    from safetensors.torch import save_file

    torch_dtype = FEATURE_DTYPES[dtype][1]
    tensors = {"sam": sam.detach().to("cpu", torch_dtype).contiguous(),
               "clip": clip.detach().to("cpu", torch_dtype).contiguous(),
               "valid": pack_valid(valid)}
    for name in ("sam", "clip"):
        if not bool(torch.isfinite(tensors[name]).all()):
            raise DataError(f"{path}: {name} features are not finite in {dtype}; encode with --dtype float32")
    # The memory layout the encoder produced, restored on reading: decoding features of another
    # layout gives logits a few ulp apart, and feature files must decode exactly as in memory.
    layouts = {f"{name}_layout": _layout(t) for name, t in (("sam", sam), ("clip", clip))}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "key": key, "box": _box_text(box), **layouts})
        return path.stat().st_size
    except OSError as exc:  # full disk, permissions: nothing half-written is left
        # atomic_path wraps the OS error in an OutputError; name the underlying reason once.
        cause = exc.__cause__ if isinstance(exc, OutputError) and isinstance(exc.__cause__, OSError) else exc
        raise DataError(f"{path}: cannot write the window file ({cause.strerror or cause})") from None


def expected_window(shapes: dict[str, tuple[int, ...]], dtype: str,
                    box: tuple[int, int, int, int]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) of a window file for ``box`` (``y0, x0, y1, x1``)."""
    st_dtype = FEATURE_DTYPES[dtype][0]
    pixels = (box[2] - box[0]) * (box[3] - box[1])
    return {"sam": (st_dtype, shapes["sam"]), "clip": (st_dtype, shapes["clip"]),
            "valid": ("U8", ((pixels + 7) // 8,))}


def _check_header(path: Path, header: Any, expected: dict[str, tuple[str, tuple[int, ...]]], key: str,
                  box: tuple[int, int, int, int]) -> tuple[int, dict[str, Any]]:
    """Validate a parsed safetensors header; returns the data size in bytes and the metadata."""
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a window file (safetensors header is not an object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} window file")
    if meta.get("key") != key:
        raise DataError(f"{path}: window file belongs to another feature folder or settings (key differs)")
    if meta.get("box") != _box_text(box):
        raise DataError(f"{path}: window file holds window {meta.get('box')!r}, expected {_box_text(box)!r}")
    if meta.get("sam_layout") not in LAYOUTS or meta.get("clip_layout") not in LAYOUTS:
        raise DataError(f"{path}: window file has an unknown memory layout")
    if set(header) != set(expected):
        raise DataError(f"{path}: window file has tensors {sorted(header)}, expected {sorted(expected)}")
    spans = []
    for name, (dtype, shape) in expected.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != list(shape):
            got = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            raise DataError(f"{path}: tensor {name!r} is {got}, expected {dtype} {list(shape)} for this model")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)):
            raise DataError(f"{path}: tensor {name!r} has invalid data offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEM_BYTES[dtype]:
            raise DataError(f"{path}: tensor {name!r} has a data size that does not fit its shape")
        spans.append((offsets[0], offsets[1]))
    position = 0
    for begin, end in sorted(spans):  # the tensors must tile the data block exactly
        if begin != position:
            raise DataError(f"{path}: tensor data overlap or leave gaps")
        position = end
    return position, meta


def read_window_bytes(path: Path, expected: dict[str, tuple[str, tuple[int, ...]]], key: str,
                      box: tuple[int, int, int, int], header_only: bool = False) -> tuple[bytes, dict[str, Any]]:
    """Read and validate a window file; returns its bytes (only the header with ``header_only``)
    and its metadata.

    At most ``8 + MAX_HEADER_BYTES + <expected data size>`` bytes are read.

    Raises:
        DataError: missing, truncated, oversized or not matching ``expected`` / ``key`` / ``box``.
    """
    data_bytes = sum(math.prod(shape) * _ITEM_BYTES[dt] for dt, shape in expected.values())
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise DataError(f"{path}: truncated window file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise DataError(f"{path}: window file header of {length} bytes (at most {MAX_HEADER_BYTES})")
            if size != 8 + length + data_bytes:
                raise DataError(f"{path}: window file has {size} bytes, expected {8 + length + data_bytes} "
                                "(truncated, or not made for this model)")
            raw = handle.read(length)
            body = b"" if header_only else handle.read(data_bytes + 1)
    except FileNotFoundError:
        raise DataError(f"{path}: window file is missing (incomplete feature folder)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read window file ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}: corrupt window file (header is not JSON)") from None
    total, meta = _check_header(path, header, expected, key, box)
    if total != data_bytes or (not header_only and len(body) != data_bytes):
        raise DataError(f"{path}: window file data size differs from its header")
    return prefix + raw + body, meta


def read_window(path: Path, expected: dict[str, tuple[str, tuple[int, ...]]], key: str,
                box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Validated ``(sam, clip, valid)`` of a window file: ``1 x C x g x g``, ``1 x D x h x w`` (on the
    CPU, stored dtype and memory layout) and ``h x w`` bool."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data, meta = read_window_bytes(path, expected, key, box)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        raise DataError(f"{path}: corrupt window file ({str(exc).splitlines()[0]})") from None
    for name in ("sam", "clip"):
        if not bool(torch.isfinite(tensors[name]).all()):
            raise DataError(f"{path}: {name} features contain NaN or infinite values")
    valid = unpack_valid(tensors["valid"], box[2] - box[0], box[3] - box[1])
    sam, clip = tensors["sam"], tensors["clip"]
    if meta["sam_layout"] == "channels_last":
        sam = sam.contiguous(memory_format=torch.channels_last)
    if meta["clip_layout"] == "channels_last":
        clip = clip.contiguous(memory_format=torch.channels_last)
    return sam, clip, valid
