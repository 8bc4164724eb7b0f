"""Presets, base-weight loading (hub id / local directory / random), parameter counts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_images

from rsrefseg import RSRefSeg
from rsrefseg.build import PRESETS, clip_hf_config, sam_hf_config
from rsrefseg.cli.model_cli import parameter_table
from rsrefseg.errors import ConfigError, WeightsError


def test_presets_are_plain_builders() -> None:
    assert set(PRESETS) == {"rsrefseg-b", "rsrefseg-l", "rsrefseg-h", "clip-b16", "tiny"}
    for name, builder in PRESETS.items():
        assert builder().preset == name


def test_unknown_preset_and_key() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        RSRefSeg.from_preset("rsrefseg-xl")
    with pytest.raises(ConfigError, match="no_such_field"):
        RSRefSeg.from_preset("tiny", no_such_field=1)


def test_tiny_is_reproducible() -> None:
    a, b = RSRefSeg.from_preset("tiny"), RSRefSeg.from_preset("tiny")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_base_directory_loads_through_the_hub_path(tiny_base_dir: Path) -> None:
    assert (tiny_base_dir / "clip" / "config.json").is_file()
    assert (tiny_base_dir / "clip" / "spiece.model").is_file()
    assert (tiny_base_dir / "sam" / "config.json").is_file()
    from_dir = RSRefSeg.from_preset("tiny", base=tiny_base_dir)
    assert from_dir.config.clip_model == str(tiny_base_dir / "clip")
    rand = RSRefSeg.from_preset("tiny")
    images, texts = tiny_images(1), ["the harbor on the far right"]
    with torch.no_grad():
        assert torch.allclose(from_dir(images, texts).mask_logits, rand(images, texts).mask_logits, atol=1e-5)


def test_missing_local_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file or directory") as err:
        RSRefSeg.from_preset("tiny", clip=str(tmp_path / "nope"))
    assert "\n" not in str(err.value)


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("HF_HOME", "/nonexistent-rsrefseg-cache")
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        RSRefSeg.from_preset("rsrefseg-b")
    message = str(err.value)
    assert time.perf_counter() - start < 30
    assert "\n" not in message
    assert "google/siglip-so400m-patch14-384" in message and "--clip DIR" in message


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rsrefseg", "init-base", "no-such-preset", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_parameter_counts_add_up() -> None:
    from transformers import SamModel, SiglipModel

    counts = {}
    for name in ("rsrefseg-b", "rsrefseg-l"):
        model = RSRefSeg.from_preset(name, device="meta")
        rows = dict((r[0], r[1]) for r in parameter_table(model))
        total = sum(p.numel() for p in model.parameters())
        assert sum(rows.values()) == total
        with torch.device("meta"):
            siglip = sum(p.numel() for p in SiglipModel(clip_hf_config(name)).parameters())
            sam = sum(p.numel() for p in SamModel(sam_hf_config(name)).parameters())
        prompter = sum(p.numel() for p in model.prompter.parameters())
        assert total == siglip + sam + prompter + rows["lora"]
        counts[name] = total
    assert 1.15e9 < counts["rsrefseg-l"] < 1.25e9  # "about 1.2B" (paper)
    assert 0.95e9 < counts["rsrefseg-b"] < 1.0e9


def test_info_cli_prints_counts() -> None:
    proc = subprocess.run([sys.executable, "-m", "rsrefseg", "info", "--preset", "rsrefseg-l"],
                          capture_output=True, text=True, check=True)
    assert "sam.vision_encoder" in proc.stdout and "total" in proc.stdout
    assert "1.207 B" in proc.stdout


@pytest.mark.slow
def test_official_configs_load_from_local_directories(tmp_path: Path) -> None:
    """HF directories saved from the official SigLIP so400m-384 and SAM ViT-B configs (random
    weights) load through the same path as hub ids."""
    from transformers import SamModel, SiglipModel

    from rsrefseg.modeling.sam_convert import sam_config_for_variant
    from rsrefseg.tokenizer import save_offline_tokenizer

    with torch.device("meta"):
        siglip = SiglipModel(clip_hf_config("rsrefseg-b"))
    siglip = siglip.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in siglip.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    probe = siglip.vision_model.encoder.layers[5].self_attn.q_proj.weight[:3, :3].clone()
    siglip.save_pretrained(tmp_path / "clip")
    save_offline_tokenizer(tmp_path / "clip", max_length=64)
    del siglip
    SamModel(sam_config_for_variant("vit_b")).save_pretrained(tmp_path / "sam")

    model = RSRefSeg.from_preset("rsrefseg-b", base=tmp_path)
    q = model.clip.model.vision_model.encoder.layers[5].self_attn.q_proj.base_layer.weight
    assert torch.equal(q[:3, :3], probe)
    assert model.clip.grid == 27 and model.embed_grid == 64
    with torch.no_grad():
        text = model.encode_text(["the storage tank on the far left"])
    assert text.tokens.shape == (1, 64, 1152) and text.pooled.shape == (1, 1152)

