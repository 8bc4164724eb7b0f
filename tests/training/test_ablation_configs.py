"""The paper's ablations as configs (``configs/ablations/*.yaml`` on top of ``configs/rrsisd-b.yaml``).

Every config resolves to rrsisd-b plus exactly the model switches its README row names, and builds
and trains one step on the ``tiny`` preset (64 px) with the synthetic data; the trained checkpoint
holds exactly the parts that ablation trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from train_helpers import MICRO_OVERRIDES

from rsrefseg.config import RSRefSegConfig
from rsrefseg.paths import repo_root
from rsrefseg.training.train_config import load_config

ABLATIONS = repo_root() / "configs" / "ablations"
BASE = repo_root() / "configs" / "rrsisd-b.yaml"
#: Each ablation's model-config changes against rrsisd-b (the README table lists the same rows).
EXPECTED: dict[str, dict[str, bool]] = {
    "baseline": {},
    "prompt-sparse-only": {"use_dense_prompt": False},
    "prompt-dense-only": {"use_sparse_prompt": False},
    "activation-no-global": {"use_global_activation": False},
    "activation-no-local": {"use_local_activation": False},
    "activation-none": {"use_global_activation": False, "use_local_activation": False},
    "lora-sam-only": {"lora_vision": False, "lora_text": False},
    "lora-clip-only": {"lora_sam": False},
    "frozen-encoders": {"lora_sam": False, "lora_vision": False, "lora_text": False},
}
SWITCHES = ("use_dense_prompt", "use_sparse_prompt", "use_global_activation", "use_local_activation",
            "lora_sam", "lora_vision", "lora_text")


def test_every_shipped_ablation_is_listed() -> None:
    assert sorted(p.stem for p in ABLATIONS.glob("*.yaml")) == sorted(EXPECTED)
    readme = (repo_root() / "README.md").read_text(encoding="utf-8")
    for name in EXPECTED:
        assert f"configs/ablations/{name}.yaml" in readme, f"{name} missing from the README table"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_is_rrsisd_b_plus_its_switches(name: str) -> None:
    base, config = load_config(BASE), load_config(ABLATIONS / f"{name}.yaml")
    assert config.work_dir == f"work_dirs/ablations/{name}"
    # Everything but the work dir and the model overrides is rrsisd-b's.
    for section in ("data", "optim", "schedule", "loss"):
        assert getattr(config, section) == getattr(base, section), section
    assert config.batch_size == base.batch_size and config.model.preset == base.model.preset == "rsrefseg-b"
    overrides = dict(config.model.overrides)
    assert overrides.pop("finetune") == "lora"
    defaults = RSRefSegConfig()
    assert set(overrides) <= set(SWITCHES)  # the configs may spell out a switch at its default value
    assert {k: v for k, v in overrides.items() if v != getattr(defaults, k)} == EXPECTED[name]
    model = RSRefSegConfig.from_dict(config.model.overrides)
    for switch in SWITCHES:
        assert getattr(model, switch) == EXPECTED[name].get(switch, getattr(defaults, switch)), switch


def _tiny_step_overrides(data: dict[str, Path], work_dir: Path) -> dict[str, Any]:
    return {
        "model.preset": "tiny", "model.random_init": True,
        **{f"model.overrides.{k}": v for k, v in MICRO_OVERRIDES.items()},
        "data.train_jsonl": str(data["train"]), "data.train_images": str(data["images"]),
        "data.val_jsonl": str(data["val"]), "data.val_images": str(data["images"]),
        "data.cache": False, "data.max_val_samples": 2, "num_workers": 0, "num_threads": 1,
        "batch_size": 2, "val_batch_size": 2, "max_steps": 1, "mixed_precision": "no",
        "tensorboard": False, "progress": False, "report_overlays": 0, "work_dir": str(work_dir),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ablation_trains_one_step_on_tiny(name: str, synthetic: dict[str, Path], tmp_path: Path) -> None:
    from rsrefseg.training.train import train

    config = load_config(ABLATIONS / f"{name}.yaml", _tiny_step_overrides(synthetic, tmp_path / "run"))
    losses: list[float] = []
    changed: dict[str, bool] = {}

    def on_step(state: Any, model: Any) -> None:
        losses.append(state.global_step)
        for key, value in model.trainable_state_dict().items():
            changed[key] = not torch.equal(value, start[key])

    from rsrefseg.build import build_from_preset

    start = build_from_preset("tiny", random_init=True, **config.model.overrides).trainable_state_dict()
    result = train(config, step_callback=on_step)
    assert result.stopped_by == "max_steps" and losses == [1]
    # The step moved each trained part: the decoder, the prompter (when used), the LoRA B matrices.
    groups = {"decoder": "sam.mask_decoder.", "prompter": "prompter.", "lora": ".lora_B."}
    moved = {g: any(v for k, v in changed.items() if pattern in k) for g, pattern in groups.items()}
    assert moved == {"decoder": True, "prompter": EXPECTED[name].get("use_sparse_prompt", True),
                     "lora": name != "frozen-encoders"}

    best = result.best_checkpoint
    assert best is not None
    saved = RSRefSegConfig.load(best / "config.json")
    for switch in SWITCHES:  # the switches travel with the checkpoint
        assert getattr(saved, switch) == EXPECTED[name].get(switch, True), switch
    with safe_open(str(best / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        proj = handle.get_tensor("prompter.input_proj.0.weight") if "prompter.input_proj.0.weight" in keys else None
    expected = EXPECTED[name]
    towers = {"sam": any(".lora_" in k and k.startswith("sam.vision_encoder.") for k in keys),
              "vision": any(".lora_" in k and ".vision_model." in k for k in keys),
              "text": any(".lora_" in k and ".text_model." in k for k in keys)}
    assert towers == {t: expected.get(f"lora_{t}", True) for t in towers}
    assert (proj is not None) == expected.get("use_sparse_prompt", True)
    if proj is not None:  # input width = (number of branches) x D, D = 64 for tiny
        n_branches = 1 + expected.get("use_global_activation", True) + expected.get("use_local_activation", True)
        assert proj.shape[1] == 64 * n_branches
    assert any(k.startswith("sam.mask_decoder.") for k in keys)
