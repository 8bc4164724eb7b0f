"""Trained-part checkpoints: round trip, strict key/shape checks, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.conftest import tiny_images

from rsrefseg import RSRefSeg
from rsrefseg.checkpoint import load_into
from rsrefseg.errors import CheckpointMismatchError, WeightsError


def _perturb(model: RSRefSeg) -> None:
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


def test_save_load_gives_identical_outputs(tiny_model: RSRefSeg, tmp_path: Path) -> None:
    _perturb(tiny_model)
    tiny_model.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(tiny_model.trainable_state_dict())  # only the trained part
    assert meta["preset"] == "tiny" and meta["sam_model"] == "random:tiny"
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model"]["preset"] == "tiny" and cfg["base"]["clip_model"] == "random:tiny"

    loaded = RSRefSeg.from_pretrained(tmp_path / "ckpt")
    images, texts = tiny_images(2, seed=11), ["the smallest storage tank", "all the vehicles"]
    with torch.no_grad():
        a = tiny_model.eval()(images, texts).mask_logits
        b = loaded(images, texts).mask_logits
    assert torch.equal(a, b)


def test_wrong_preset_lists_mismatched_keys(tiny_model: RSRefSeg, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    other = RSRefSeg.from_preset("tiny", down_spatial_times=2, lora_r=8, lora_text=False)
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(other, tmp_path / "ckpt")
    exc = err.value
    assert exc.unexpected and any("text_model" in k for k in exc.unexpected)
    assert exc.shape_mismatch and any("lora_A" in k for k in exc.shape_mismatch)
    assert exc.missing and any(k.startswith("prompter.down.1") for k in exc.missing)
    message = str(exc)
    assert "\n" not in message and "tiny" in message and "missing" in message and "unexpected" in message


def test_failed_save_keeps_previous_checkpoint(tiny_model: RSRefSeg, tmp_path: Path, monkeypatch) -> None:
    tiny_model.save_pretrained(tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    _perturb(tiny_model)
    with pytest.raises(OSError):
        tiny_model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not a checkpoint directory"):
        RSRefSeg.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"preset": "tiny", "clip_model": "random:tiny",
                                                                "sam_model": "random:tiny"}}))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        RSRefSeg.from_pretrained(tmp_path)
