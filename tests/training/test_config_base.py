"""Training configs that build on another file (``base:``), as the ablation configs do."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsrefseg.cli.main import main
from rsrefseg.errors import ConfigError
from rsrefseg.training.config_base import merge_config, read_config_file
from rsrefseg.training.train_config import load_config


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_merge_is_deep_for_mappings_and_replaces_the_rest() -> None:
    base = {"model": {"preset": "rsrefseg-b", "overrides": {"finetune": "lora", "lora_r": 16}},
            "optim": {"betas": [0.9, 0.999]}, "batch_size": 1}
    out = merge_config(base, {"model": {"overrides": {"lora_r": 8}}, "optim": {"betas": [0.8, 0.9]}})
    assert out == {"model": {"preset": "rsrefseg-b", "overrides": {"finetune": "lora", "lora_r": 8}},
                   "optim": {"betas": [0.8, 0.9]}, "batch_size": 1}
    assert base["model"]["overrides"]["lora_r"] == 16  # the base is not modified


def test_base_chain_relative_paths_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "root.yaml", "model: {preset: rsrefseg-b, overrides: {finetune: lora}}\n"
                                   "optim: {lr: 1.0e-4}\nbatch_size: 1\nwork_dir: work_dirs/root\n")
    _write(tmp_path / "mid" / "mid.yaml", "base: ../root.yaml\noptim: {weight_decay: 0.01}\n")
    monkeypatch.setenv("MID_DIR", str(tmp_path / "mid"))
    leaf = _write(tmp_path / "leaf" / "leaf.yaml",
                  "base: ${MID_DIR}/mid.yaml\nmodel: {overrides: {use_sparse_prompt: false}}\nwork_dir: w/leaf\n")
    data = read_config_file(leaf)
    assert "base" not in data
    config = load_config(leaf, {"batch_size": 2})
    assert config.model.preset == "rsrefseg-b" and config.model.overrides == {"finetune": "lora",
                                                                               "use_sparse_prompt": False}
    assert config.optim.lr == 1e-4 and config.optim.weight_decay == 0.01
    assert config.work_dir == "w/leaf" and config.batch_size == 2  # leaf, then the command line win


def test_bad_bases_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_config_file(a)
    missing = _write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: its base config .*nowhere\.yaml does not exist"):
        read_config_file(missing)
    for text in ("base: 3\n", "base: [a.yaml]\n", "base: ''\n"):
        bad = _write(tmp_path / "bad.yaml", text)
        with pytest.raises(ConfigError, match="'base' must be the path"):
            read_config_file(bad)
    broken_base = _write(tmp_path / "broken.yaml", "model: [\n")
    child = _write(tmp_path / "child.yaml", f"base: {broken_base.name}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        read_config_file(child)
    for i in range(10):  # a chain longer than MAX_DEPTH
        _write(tmp_path / f"c{i}.yaml", f"base: c{i + 1}.yaml\n" if i < 9 else "batch_size: 1\n")
    with pytest.raises(ConfigError, match="nested config bases"):
        read_config_file(tmp_path / "c0.yaml")
    # Through the CLI: one error line, status 2.
    code = main(["train", "--config", str(a), "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "cycle" in err
