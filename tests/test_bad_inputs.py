"""Bad inputs at every entry point of this area (``eval``, ``data inspect``, ``train``, the Python API).

Each row gives the exit status, and the test checks: one ``error:`` line naming the file, no
traceback, nothing created or changed on disk, and the peak resident memory during the row below
:data:`PEAK_LIMIT_KB`. All rows run in ONE subprocess (``bad_inputs_driver.py``: torch is imported
once; the peak is reset between rows through ``/proc/self/clear_refs``).

Why 1 GB: the driver with torch and the tiny model resident peaks at ~0.45 GB on any row (measured:
356-454 MB); every bad input here asks for far more if it is not refused up front (the
100000 x 100000 PNG header 30 GB, the 14000 x 14000 decompression bomb 0.2 GB grey + 0.6 GB RGB +
0.2 GB validity, the 50000 x 50000 GeoTIFF 2.5 GB of pixels + 2.5 GB of mask, a safetensors
header claiming a 4 TB tensor, arch_overrides describing a 19,000 GB model), while a correct refusal
costs a few MB.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).with_name("training")))  # shared helpers of the training tests
from train_helpers import MICRO_OVERRIDES, cli_env, micro_config, write_yaml

DRIVER = Path(__file__).with_name("bad_inputs_driver.py")
PEAK_LIMIT_KB = 1_000_000
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes, color_type: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _bomb_png(side: int) -> bytes:
    """A grey PNG of ``side x side`` zeros: a few hundred KB that decode to ``side**2`` bytes."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [packer.compress(row * 500) for _ in range(side // 500)]
    parts.append(packer.compress(row * (side % 500)) + packer.flush())
    return _png(side, side, b"".join(parts))


def _record(file_name: str, h: int = 40, w: int = 50, **fields: Any) -> dict[str, Any]:
    from rsrefseg.data.records import encode_mask

    mask = np.zeros((h, w), dtype=bool)
    mask[5:15, 10:20] = True
    return {"image_id": 1, "sent": "the square", "file_name": file_name, "segmentation": encode_mask(mask),
            **fields}


def _jsonl(path: Path, rows: list[Any], prefix: bytes = b"") -> str:
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return str(path)


class _Marker:
    """Unpickling this creates a file (what a hostile pickle could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _build_sandbox(root: Path) -> dict[str, Any]:
    """Every bad file of the table (small: the largest is ~0.6 MB)."""
    import rasterio
    import rasterio.errors
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from rsrefseg import RSRefSeg
    from rsrefseg.training.state import TrainerState, save_resumable

    f: dict[str, Any] = {"root": root, "marker": root / "PWNED"}
    img = root / "images"
    img.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "secret.png")
    good_png = (img / "a.png").read_bytes()
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img / "full.jpg", quality=95)
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(2000))
    (img / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (img / "truncated.jpg").write_bytes((img / "full.jpg").read_bytes()[:600])
    (img / "zero.png").write_bytes(b"")
    (img / "zero.tif").write_bytes(b"")
    (img / "text.tif").write_bytes(b"this is not a TIFF\n" * 10)
    (img / "huge_header.png").write_bytes(_png(100_000, 100_000, zlib.compress(b"\x00" * 1000), color_type=2))
    (img / "bomb.png").write_bytes(_bomb_png(14_000))
    profile = {"driver": "GTiff", "dtype": "uint8", "tiled": True, "blockxsize": 512, "blockysize": 512,
               "compress": "deflate", "sparse_ok": True}
    with warnings.catch_warnings():  # plain rasters without georeferencing, on purpose
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(img / "huge.tif", "w", width=50_000, height=50_000, count=1, **profile):
            pass  # nothing written: a sparse 50000 x 50000 file of ~40 KB
        with rasterio.open(img / "twoband.tif", "w", width=50, height=40, count=2, dtype="uint8",
                           driver="GTiff") as dst:
            dst.write(np.zeros((2, 40, 50), dtype=np.uint8))
    f["images"] = str(img)
    f["good_image"] = str(img / "a.png")

    jsonl = root / "jsonl"
    jsonl.mkdir()
    good = [_record("a.png"), _record("a.png", sent="the other square")]
    f["good"] = _jsonl(jsonl / "good.jsonl", good)
    f["bom"] = _jsonl(jsonl / "bom.jsonl", good, prefix=b"\xef\xbb\xbf")
    f["bad_utf8"] = str(jsonl / "bad_utf8.jsonl")
    Path(f["bad_utf8"]).write_bytes(json.dumps(_record("a.png")).encode().replace(b"the square", b"the \xff\xfe"))
    f["not_json"] = str(jsonl / "not_json.jsonl")
    Path(f["not_json"]).write_text('{"image_id": 1,\n', encoding="utf-8")
    f["empty_sent"] = _jsonl(jsonl / "empty_sent.jsonl", [_record("a.png", sent="")])
    f["space_sent"] = _jsonl(jsonl / "space_sent.jsonl", [_record("a.png", sent=" \t ")])
    f["long_sent"] = _jsonl(jsonl / "long_sent.jsonl", [_record("a.png", sent="the tank " * 600)])
    f["unsafe"] = _jsonl(jsonl / "unsafe.jsonl", [_record("a.png"), _record("../secret.png")])
    f["absolute"] = _jsonl(jsonl / "absolute.jsonl", [_record(str(root / "secret.png"))])
    f["rle_overflow"] = _jsonl(jsonl / "rle_overflow.jsonl",
                               [_record("a.png", segmentation={"size": [40, 50], "counts": [2**64, 5]})])
    f["bbox"] = _jsonl(jsonl / "bbox.jsonl", [_record("a.png", bbox=[-5, 0, 10, 10]),
                                              _record("a.png", sent="x", bbox=[45, 35, 10, 10])])
    f["dups"] = _jsonl(jsonl / "dups.jsonl", [good[0], good[1], good[0]])
    f["missing_image"] = _jsonl(jsonl / "missing_image.jsonl", [_record("nowhere.png")])
    for name, (h, w) in {"corrupt.png": (40, 50), "truncated.png": (40, 50), "truncated.jpg": (40, 50),
                         "zero.png": (40, 50), "zero.tif": (40, 50), "text.tif": (40, 50),
                         "twoband.tif": (40, 50), "huge_header.png": (40, 50), "bomb.png": (40, 50),
                         "huge.tif": (40, 50)}.items():
        f[f"img:{name}"] = _jsonl(jsonl / f"img_{name}.jsonl", [_record(name, h, w)])

    model = RSRefSeg.from_preset("tiny", finetune="full", **MICRO_OVERRIDES)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    f["ckpt"] = str(ckpt)
    weights = (ckpt / "model.safetensors").read_bytes()
    config = json.loads((ckpt / "config.json").read_text())

    def broken(name: str, weights_bytes: bytes | None = None, config_obj: Any = None,
               config_bytes: bytes | None = None) -> None:
        target = root / f"ckpt_{name}"
        shutil.copytree(ckpt, target)
        if weights_bytes is not None:
            (target / "model.safetensors").write_bytes(weights_bytes)
        if config_obj is not None:
            (target / "config.json").write_text(json.dumps(config_obj))
        if config_bytes is not None:
            (target / "config.json").write_bytes(config_bytes)
        f[f"ckpt_{name}"] = str(target)

    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    broken("zero", weights_bytes=b"")
    broken("truncated", weights_bytes=weights[: len(weights) // 2])
    broken("huge_tensor", weights_bytes=len(header).to_bytes(8, "little") + header + b"\0" * 64)
    broken("huge_header_len", weights_bytes=(2**62).to_bytes(8, "little") + b"{}")
    pickled = root / "pickled.pt"
    torch.save({"w": _Marker(str(f["marker"]))}, pickled)
    broken("pickle", weights_bytes=pickled.read_bytes())
    pickled.unlink()
    broken("cfg_list", config_obj=[1, 2])
    broken("cfg_type", config_obj={**config, "model": {**config["model"], "lora_r": "abc"}})
    broken("cfg_preset", config_obj={**config, "model": {**config["model"], "preset": "rsrefseg-xxl"}})
    broken("cfg_arch", config_obj={**config, "model": {**config["model"], "arch_overrides": {
        "sam": {"vision_config": {"hidden_size": 65536, "num_hidden_layers": 64}}}}})
    broken("cfg_utf8", config_bytes=b'{"model": {"preset": "\xff"}}')
    broken("no_cfg")
    (root / "ckpt_no_cfg" / "config.json").unlink()
    save_file({"x": torch.zeros(2)}, str(root / "ckpt_mismatch_weights.safetensors"))
    broken("mismatch", weights_bytes=(root / "ckpt_mismatch_weights.safetensors").read_bytes())
    (root / "ckpt_mismatch_weights.safetensors").unlink()

    # training: configs and resumable folders
    data = {"train": Path(f["good"]), "val": Path(f["good"]), "images": img}
    run = root / "run"
    cfg = micro_config(data, run)
    cfg["model"]["overrides"]["finetune"] = "full"  # as the model of the resumable folders below
    f["train_cfg"] = str(write_yaml(cfg, root / "train.yaml"))
    f["unsafe_cfg"] = str(write_yaml(micro_config({**data, "train": Path(f["unsafe"])}, run), root / "unsafe.yaml"))
    (root / "evil.yaml").write_text(f'!!python/object/apply:os.system ["touch {f["marker"]}"]\n')
    f["evil_yaml"] = str(root / "evil.yaml")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    f["list_yaml"] = str(root / "list.yaml")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    acc = type("Acc", (), dict(is_main_process=True, process_index=0, num_processes=1, scaler=None,
                               distributed_type="NO", wait_for_everyone=lambda self: None,
                               unwrap_model=lambda self, m: m))()
    resumable = save_resumable(run / "checkpoints", acc, model, optimizer, scheduler, TrainerState(global_step=1))
    bad_shape = run / "checkpoints" / "step-00000002"
    shutil.copytree(resumable, bad_shape)
    from rsrefseg.training.state_files import load_tree, save_tree

    state = load_tree(bad_shape / "optimizer.safetensors")
    state["state"][0]["exp_avg"] = torch.zeros(7, 7)
    save_tree(state, bad_shape / "optimizer.safetensors")
    f["resume_bad_shape"] = str(bad_shape)
    old = root / "old_ckpt"
    old.mkdir()
    (old / "trainer_state.json").write_text(json.dumps({"epoch": 0, "batch_in_epoch": 1, "global_step": 1}))
    torch.save({"state": {}, "param_groups": [_Marker(str(f["marker"]))]}, old / "optimizer.pt")
    f["resume_pickle"] = str(old)
    listy = root / "listy_ckpt"
    shutil.copytree(resumable, listy)
    (listy / "trainer_state.json").write_text("[1, 2]")
    f["resume_list"] = str(listy)
    f["a_file"] = str(root / "a_file.txt")
    Path(f["a_file"]).write_text("x")
    if IS_ROOT:  # root writes through permission bits: use a place no one can write
        f["unwritable"] = "/sys/rsrefseg-bad-input-test/out"
    else:
        locked = root / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        f["unwritable"] = str(locked / "out")
    return f


def _rows(f: dict[str, Any]) -> list[dict[str, Any]]:
    """``(id, row, expected exit status, text the error line must contain)``."""
    rows: list[dict[str, Any]] = []

    def add(row_id: str, code: int, names: str, **row: Any) -> None:
        rows.append({"id": row_id, "expect": code, "names": names, **row})

    ckpt, images, out = f["ckpt"], f["images"], str(f["root"] / "out")

    def ev(data: str, checkpoint: str = ckpt, *extra: str) -> list[str]:
        return ["eval", "--checkpoint", checkpoint, "--data", data, "--images", images, "--out", out,
                "--overlays", "0", *extra]

    # eval: data
    for key, names in [("bad_utf8", f["bad_utf8"]), ("not_json", f["not_json"] + ":1"),
                       ("empty_sent", f["empty_sent"] + ":1"), ("space_sent", f["space_sent"] + ":1"),
                       ("long_sent", f["long_sent"] + ":1"), ("unsafe", f["unsafe"] + ":2"),
                       ("absolute", f["absolute"] + ":1"), ("missing_image", "nowhere.png"),
                       ("rle_overflow", f["rle_overflow"] + ":1")]:
        add(f"eval/{key}", 2, names, cli=ev(f[key]))
    for name in ("corrupt.png", "truncated.png", "truncated.jpg", "zero.png", "zero.tif", "text.tif",
                 "twoband.tif", "huge_header.png", "bomb.png", "huge.tif"):
        add(f"eval/image {name}", 2, f"{images}/{name}", cli=ev(f[f"img:{name}"]))
    # eval: checkpoints and outputs
    for name in ("zero", "truncated", "huge_tensor", "huge_header_len", "pickle", "mismatch"):
        add(f"eval/checkpoint {name}", 2, f"{f['ckpt_' + name]}/model.safetensors", cli=ev(f["good"], f[f"ckpt_{name}"]))
    for name in ("cfg_list", "cfg_type", "cfg_preset", "cfg_arch", "cfg_utf8"):
        add(f"eval/checkpoint {name}", 2, f"{f['ckpt_' + name]}/config.json", cli=ev(f["good"], f[f"ckpt_{name}"]))
    add("eval/checkpoint no_cfg", 2, f["ckpt_no_cfg"], cli=ev(f["good"], f["ckpt_no_cfg"]))
    add("eval/--out is a file", 2, f["a_file"],
        cli=["eval", "--checkpoint", ckpt, "--data", f["good"], "--images", images, "--out", f["a_file"]])
    add("eval/--out not writable", 2, f["unwritable"],
        cli=["eval", "--checkpoint", ckpt, "--data", f["good"], "--images", images, "--out", f["unwritable"]])

    # data inspect
    def di(data: str, *extra: str) -> list[str]:
        return ["data", "inspect", data, *extra]

    add("inspect/clean with a BOM", 0, "", cli=di(f["bom"], "--images", images))
    add("inspect/missing file", 2, str(f["root"] / "nope.jsonl"), cli=di(str(f["root"] / "nope.jsonl")))
    add("inspect/invalid UTF-8", 2, f["bad_utf8"], cli=di(f["bad_utf8"]))
    add("inspect/not JSON", 2, f["not_json"] + ":1", cli=di(f["not_json"]))
    add("inspect/missing image folder", 2, str(f["root"] / "no_images"),
        cli=di(f["good"], "--images", str(f["root"] / "no_images")))
    for key in ("rle_overflow", "bbox", "dups", "unsafe", "absolute", "empty_sent", "long_sent", "missing_image"):
        add(f"inspect/{key}", 1, "", cli=di(f[key], "--images", images))
    for name in ("corrupt.png", "zero.png", "huge_header.png", "bomb.png", "huge.tif", "text.tif"):
        add(f"inspect/image {name}", 1, "", cli=di(f[f"img:{name}"], "--images", images))

    # train
    def tr(*extra: str) -> list[str]:
        return ["train", "--config", f["train_cfg"], *extra]

    add("train/YAML with a python tag", 2, f["evil_yaml"], cli=["train", "--config", f["evil_yaml"]])
    add("train/YAML not a mapping", 2, f["list_yaml"], cli=["train", "--config", f["list_yaml"]])
    add("train/override of the wrong type", 2, "model.overrides.lora_r", cli=tr("--model.overrides.lora_r", "abc"))
    add("train/unknown preset", 2, "model.preset", cli=tr("--model.preset", "rsrefseg-xxl"))
    add("train/work_dir is a file", 2, f["a_file"], cli=tr("--work_dir", f["a_file"]))
    add("train/work_dir not writable", 2, f["unwritable"], cli=tr("--work_dir", f["unwritable"]))
    add("train/file name leaving the image folder", 2, f["unsafe"] + ":2",
        cli=["train", "--config", f["unsafe_cfg"], "--resume", f["resume_bad_shape"]])
    add("train/resume pickle optimizer.pt", 2, f"{f['resume_pickle']}/optimizer.pt",
        cli=tr("--resume", f["resume_pickle"]))
    add("train/resume trainer_state.json a list", 2, f"{f['resume_list']}/trainer_state.json",
        cli=tr("--resume", f["resume_list"]))
    add("train/resume optimizer state of another shape", 2, f"{f['resume_bad_shape']}/optimizer.safetensors",
        cli=tr("--resume", f["resume_bad_shape"]))
    add("train/resume folder missing", 2, str(f["root"] / "nothing"), cli=tr("--resume", str(f["root"] / "nothing")))

    # Python API
    for name in ("corrupt.png", "truncated.png", "truncated.jpg", "zero.png", "zero.tif", "text.tif",
                 "twoband.tif", "huge_header.png", "bomb.png", "huge.tif", "nowhere.png"):
        add(f"api/read_image {name}", 2, f"{images}/{name}", api="read_image", args=[f"{images}/{name}"])
        if name in ("corrupt.png", "zero.png", "twoband.tif", "bomb.png", "huge.tif"):
            add(f"api/set_image {name}", 2, f"{images}/{name}", api="set_image", args=[f"{images}/{name}"])
    for name in ("zero", "truncated", "huge_tensor", "huge_header_len", "pickle", "mismatch"):
        add(f"api/from_pretrained {name}", 2, f"{f['ckpt_' + name]}/model.safetensors", api="from_pretrained",
            args=[f[f"ckpt_{name}"]])
    for name in ("cfg_list", "cfg_type", "cfg_preset", "cfg_arch", "cfg_utf8"):
        add(f"api/from_pretrained {name}", 2, f"{f['ckpt_' + name]}/config.json", api="from_pretrained",
            args=[f[f"ckpt_{name}"]])
    add("api/Predictor.from_pretrained truncated", 2, f"{f['ckpt_truncated']}/model.safetensors",
        api="predictor_from_pretrained", args=[f["ckpt_truncated"]])
    add("api/Predictor.from_pretrained cfg_type", 2, f"{f['ckpt_cfg_type']}/config.json",
        api="predictor_from_pretrained", args=[f["ckpt_cfg_type"]])
    add("api/predict empty expression", 2, "expression 1", api="predict", args=[""])
    add("api/predict whitespace expression", 2, "expression 2", api="predict", args=["the ship", " \n\t"])
    add("api/predict 5000-character expression", 2, "expression 1", api="predict", args=["x" * 5000])
    add("api/predict no expression", 2, "no expression", api="predict", args=[])
    add("api/predict lone surrogate (undecodable bytes)", 0, "", api="predict", args=["the \udcff ship"])
    return rows


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad-inputs")
    sandbox = root / "sandbox"
    sandbox.mkdir()
    files = _build_sandbox(sandbox)
    rows = _rows(files)
    spec = root / "rows.json"
    spec.write_text(json.dumps({"rows": rows, "checkpoint": files["ckpt"], "image": files["good_image"]}))
    results = root / "results.json"
    done = subprocess.run([sys.executable, str(DRIVER), str(spec), str(sandbox), str(results)], env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if os.environ.get("RSREFSEG_BAD_INPUTS_REPORT"):  # the table for docs/security.md
        Path(os.environ["RSREFSEG_BAD_INPUTS_REPORT"]).write_text(results.read_text())
    return {"rows": {r["id"]: r for r in rows}, "results": json.loads(results.read_text()), "files": files}


def _row_ids() -> list[str]:
    fake = {k: f"<{k}>" for k in ("ckpt", "images", "good", "bom", "bad_utf8", "not_json", "empty_sent",
                                   "space_sent", "long_sent", "unsafe", "absolute", "missing_image",
                                   "rle_overflow", "bbox", "dups", "train_cfg", "unsafe_cfg", "evil_yaml",
                                   "list_yaml", "resume_bad_shape", "resume_pickle", "resume_list", "a_file",
                                   "unwritable", "good_image")}
    fake["root"] = Path("/root")
    return [r["id"] for r in _rows(_Fake(fake))]


class _Fake(dict):  # type: ignore[type-arg]
    """Placeholder paths: the row ids without building the sandbox (collection stays instant)."""

    def __missing__(self, key: str) -> str:
        return f"<{key}>"


@pytest.mark.parametrize("row_id", _row_ids())
def test_bad_input(table: dict[str, Any], row_id: str) -> None:
    row, result = table["rows"][row_id], table["results"][row_id]
    stderr = result["stderr"]
    assert "Traceback" not in stderr and result["code"] != "traceback", stderr[-2000:]
    assert result["code"] == row["expect"], stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if row["expect"] == 2:
        assert len(errors) == 1, stderr[-2000:]
        assert row["names"] in errors[0], errors[0]
    else:
        assert errors == [], stderr
    assert result["changed"] == [], f"files created or changed: {result['changed']}"
    if result["peak_kb"]:
        assert result["peak_kb"] < PEAK_LIMIT_KB, f"peak RSS {result['peak_kb']} kB"
    assert not table["files"]["marker"].exists(), "code from a file was executed"
