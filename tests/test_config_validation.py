"""Checkpoint ``config.json`` and training ``model.overrides``: types checked against the dataclass
fields, unknown presets refused, models too large for the machine refused before they are built."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from rsrefseg.config import PRESET_NAMES, RSRefSegConfig
from rsrefseg.errors import ConfigError, RSRefSegError
from rsrefseg.training.train_config import config_from_dict


def test_preset_names_match_the_builders() -> None:
    from rsrefseg.build import PRESETS

    assert tuple(sorted(PRESETS)) == PRESET_NAMES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsrefseg import RSRefSeg

    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    RSRefSeg.from_preset("tiny").save_pretrained(directory)
    return directory


def _variant(checkpoint: Path, tmp_path: Path, payload: Any) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    (target / "config.json").write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return target


def _model(checkpoint: Path, **changes: Any) -> dict[str, Any]:
    payload = json.loads((checkpoint / "config.json").read_text())
    payload["model"].update(changes)
    return payload


HUGE_SAM = {"sam": {"vision_config": {"hidden_size": 65536, "num_hidden_layers": 64}}}


@pytest.mark.parametrize("name, payload, match", [
    ("list", [1, 2], "expected a JSON object"),
    ("model_list", {"model": [1]}, "expected a JSON object"),
    ("string_rank", {"lora_r": "abc"}, "'lora_r' must be an integer, got 'abc'"),
    ("bool_rank", {"lora_r": True}, "'lora_r' must be an integer, got True"),
    ("nan_dropout", {"lora_dropout": float("nan")}, "'lora_dropout' must be a number"),
    ("null_size", {"sam_image_size": None}, "'sam_image_size' must be an integer"),
    ("huge_size", {"sam_image_size": 10**9}, "sam_image_size must be in"),
    ("unknown_key", {"lora_rank": 3}, "unknown model config key"),
    ("unknown_preset", {"preset": "rsrefseg-xxl"}, "unknown preset 'rsrefseg-xxl'"),
    ("bad_overrides", {"arch_overrides": {"sam": 5}}, "cannot be built"),
    ("wrong_type_overrides", {"arch_overrides": {"sam": {"vision_config": {"num_hidden_layers": "x"}}}},
     "cannot be built"),
    ("huge_model", {"arch_overrides": HUGE_SAM}, "GiB of weights, more than"),
    ("not_json", "{", "not valid JSON"),
    ("not_utf8", "\udcff", "cannot read"),
])
def test_bad_checkpoint_configs_are_one_line_errors(checkpoint: Path, tmp_path: Path, name: str, payload: Any,
                                                    match: str) -> None:
    from rsrefseg import RSRefSeg

    if isinstance(payload, dict) and "model" not in payload:
        payload = _model(checkpoint, **payload)
    if payload == "\udcff":
        target = _variant(checkpoint, tmp_path, "")
        (target / "config.json").write_bytes(b'{"model": {"preset": "\xff"}}')
    else:
        target = _variant(checkpoint, tmp_path, payload)
    with pytest.raises(RSRefSegError, match=match) as info:
        RSRefSeg.from_pretrained(target)
    assert str(target / "config.json") in str(info.value) and "\n" not in str(info.value)


def test_config_from_dict_checks_types_without_converting() -> None:
    good = RSRefSegConfig().to_dict()
    assert RSRefSegConfig.from_dict(good) == RSRefSegConfig()
    with pytest.raises(ConfigError, match="'clip_revision' must be a string or null, got 5"):
        RSRefSegConfig.from_dict({**good, "clip_revision": 5}, source="c.json")
    with pytest.raises(ConfigError, match=r"c\.json: the model config must be a JSON object"):
        RSRefSegConfig.from_dict([1], source="c.json")


@pytest.mark.parametrize("overrides, match", [
    ({"lora_r": "abc"}, "model.overrides.lora_r: expected an integer, got 'abc'"),
    ({"lora_sam": "maybe"}, "model.overrides.lora_sam: expected true/false"),
    ({"arch_overrides": [1]}, "model.overrides.arch_overrides: expected a mapping"),
    ({"lora_rank": 4}, "unknown config key 'model.overrides.lora_rank'"),
])
def test_training_model_overrides_are_typed(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"model": {"overrides": overrides}})


def test_training_overrides_are_converted_like_every_value() -> None:
    config = config_from_dict({"model": {"overrides": {"lora_r": "8", "finetune": "full", "lora_sam": "false"}}})
    assert config.model.overrides == {"lora_r": 8, "finetune": "full", "lora_sam": False}
    with pytest.raises(ConfigError, match=r"model\.preset: unknown preset 'x'"):
        config_from_dict({"model": {"preset": "x"}})


def test_train_cli_reports_a_bad_override_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rsrefseg.cli.main import main

    code = main(["train", "--work_dir", str(tmp_path / "run"), "--model.overrides.lora_r", "abc"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: model.overrides.lora_r: expected an integer, got 'abc'\n"
    assert not (tmp_path / "run").exists()  # nothing created
