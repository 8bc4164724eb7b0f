"""Faults while writing: a full disk or an I/O error in the middle of a checkpoint or ``metrics.json``
leaves the previous file intact and gives one clear line; SIGKILL while ``best`` is swapped leaves a
loadable ``best``."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).with_name("training")))  # shared helpers of the training tests
from train_helpers import MICRO_OVERRIDES, make_synthetic

from rsrefseg.errors import OutputError

FAULTS = [(errno.ENOSPC, "No space left on device"), (errno.EIO, "Input/output error")]


def _micro(seed: int = 0) -> Any:
    from rsrefseg import RSRefSeg

    model = RSRefSeg.from_preset("tiny", finetune="full", **MICRO_OVERRIDES)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.prompter.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return model


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _half_then_fail(code: int, rust: bool) -> Any:
    """A ``safetensors.torch.save_file`` that writes half of the real file, then fails like the disk."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        if rust:  # what safetensors' Rust writer raises for an OS error
            from safetensors import SafetensorError

            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        raise OSError(code, os.strerror(code))

    return save_file


@pytest.mark.parametrize("code, text", FAULTS)
@pytest.mark.parametrize("rust", [False, True])
def test_fault_mid_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     code: int, text: str, rust: bool) -> None:
    import safetensors.torch

    from rsrefseg.checkpoint import save_checkpoint
    from rsrefseg.training.state import save_best

    model = _micro()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    best = save_best(tmp_path / "checkpoints", model, {"step": 1})
    before = {p: p.read_bytes() for p in (ckpt / "model.safetensors", best / "model.safetensors")}
    listing = _listing(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail(code, rust))
    newer = _micro(seed=1)
    with pytest.raises(OutputError) as info:
        save_checkpoint(newer, ckpt)
    message = str(info.value)
    assert message.startswith(f"{ckpt / 'model.safetensors'}: cannot write ({text} [errno {code}])")
    assert "\n" not in message and info.value.errno == code
    with pytest.raises(OutputError, match=text):
        save_best(tmp_path / "checkpoints", newer, {"step": 2})
    assert {p: p.read_bytes() for p in before} == before  # byte for byte the previous files
    assert _listing(tmp_path) == listing  # no temp file or folder left


@pytest.mark.parametrize("code, text", FAULTS)
def test_fault_mid_resumable_checkpoint_leaves_no_half_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              code: int, text: str) -> None:
    import safetensors.torch

    from rsrefseg.training.state import TrainerState, list_checkpoints, save_resumable

    model = _micro()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    acc = type("Acc", (), dict(is_main_process=True, process_index=0, num_processes=1, scaler=None,
                               distributed_type="NO", wait_for_everyone=lambda self: None,
                               unwrap_model=lambda self, m: m))()
    root = tmp_path / "checkpoints"
    save_resumable(root, acc, model, optimizer, scheduler, TrainerState(global_step=1))
    listing = _listing(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", _half_then_fail(code, True))
    with pytest.raises(OutputError, match=rf"\.tmp-step-00000002/\S+\.safetensors: cannot write \({text}"):
        save_resumable(root, acc, model, optimizer, scheduler, TrainerState(global_step=2))
    assert _listing(tmp_path) == listing and [p.name for p in list_checkpoints(root)] == ["step-00000001"]


def test_real_write_error_from_the_safetensors_writer(tmp_path: Path) -> None:
    """Not simulated: the file-size limit makes the kernel refuse the write (EFBIG) inside the Rust writer."""
    from rsrefseg.checkpoint import save_checkpoint

    model = _micro()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    before = (ckpt / "model.safetensors").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(OutputError, match=r"model\.safetensors: cannot write \(File too large \[errno 27\]\)"):
            save_checkpoint(_micro(seed=2), ckpt)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from rsrefseg.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("faults")
    data = make_synthetic(root / "data", n_train=1, n_val=3)
    data["ckpt"] = save_checkpoint(_micro(), root / "ckpt")
    return data


class _FailingFile:
    """A text file whose writes go half-way, then fail like a full disk / a bad sector."""

    def __init__(self, handle: Any, code: int) -> None:
        self.handle, self.code = handle, code

    def write(self, text: str) -> int:
        self.handle.write(text[: len(text) // 2])
        raise OSError(self.code, os.strerror(self.code))

    def __enter__(self) -> _FailingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


@pytest.mark.parametrize("code, text", FAULTS)
def test_fault_mid_metrics_json_keeps_the_previous_one(eval_setup: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], code: int,
                                                       text: str) -> None:
    import rsrefseg.utils
    from rsrefseg.cli.main import main

    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(eval_setup["ckpt"]), "--data", str(eval_setup["val"]), "--images",
            str(eval_setup["images"]), "--overlays", "0", "--out", str(out)]
    out.mkdir()
    stale = out / ".metrics.json.999999999-abcdefgh.tmp"  # what a SIGKILLed run leaves (no such pid)
    stale.write_text("{")
    assert main(args) == 0
    assert not stale.exists()  # the next run into the folder removed it
    capsys.readouterr()
    metrics = (out / "metrics.json").read_bytes()
    listing = _listing(out)

    def failing_open(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        handle = open(path, mode, *a, **k)  # closed by the wrapper
        return _FailingFile(handle, code) if "w" in mode and Path(path).name.startswith(".metrics.json.") else handle

    monkeypatch.setattr(rsrefseg.utils, "open", failing_open, raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err  # the progress bar, then one error line
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        f"error: {out / 'metrics.json'}: cannot write ({text} [errno {code}]); any previous file there is unchanged"]
    assert "Traceback" not in err
    assert (out / "metrics.json").read_bytes() == metrics and json.loads(metrics)["n"] == 6
    assert _listing(out) == listing


class _Trained:
    """The trained part of a model as plain CPU tensors: what ``save_checkpoint`` reads from a model.

    The forked child below must not run torch kernels (a thread pool does not survive ``fork``);
    saving these tensors runs none."""

    def __init__(self, model: Any) -> None:
        self.config = model.config
        self.state = {k: v.detach().clone().contiguous() for k, v in model.trainable_state_dict().items()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def _killed_while_saving_best(root: Path, mode: str) -> int:
    """Save ``best`` (step 1), then in a forked child save it again (step 2) with a SIGKILL at the swap
    point; returns the child's wait status."""
    from rsrefseg.training import state

    model = _micro()
    state.save_best(root, model, {"step": 1})
    newer = _Trained(_micro(seed=5))
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: never returns into pytest
        real_exchange, real_replace = state.exchange_paths, os.replace

        def die() -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        if mode == "before_exchange":
            state.exchange_paths = lambda a, b: die()
        elif mode == "after_exchange":
            state.exchange_paths = lambda a, b: real_exchange(a, b) and die()
        else:  # no RENAME_EXCHANGE here: two renames, killed between them
            def replace(a: Any, b: Any) -> None:
                real_replace(a, b)
                if Path(b).name == ".old-best":
                    die()

            state.exchange_paths = lambda a, b: False
            state.os.replace = replace
        state.save_best(root, newer, {"step": 2})
    finally:
        os._exit(3)  # not killed: the test fails on the status


@pytest.mark.parametrize("mode, expected_step", [("before_exchange", 1), ("after_exchange", 2),
                                                 ("between_renames", 1)])
def test_sigkill_during_the_best_swap_leaves_a_loadable_best(tmp_path: Path, mode: str, expected_step: int) -> None:
    from rsrefseg import RSRefSeg
    from rsrefseg.training.state import prepare_checkpoint_root

    root = tmp_path / "checkpoints"
    status = _killed_while_saving_best(root, mode)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    if mode == "between_renames":  # the one window without `best`: the next run puts the old one back
        assert sorted(p.name for p in root.iterdir()) == [".old-best", ".tmp-best"]
        prepare_checkpoint_root(root)
    else:  # one atomic exchange: `best` is always there, old or new; .tmp-best holds the other one
        assert sorted(p.name for p in root.iterdir()) == [".tmp-best", "best"]
    model = RSRefSeg.from_pretrained(root / "best")  # loads: complete and consistent
    assert json.loads((root / "best" / "config.json").read_text())["best"]["step"] == expected_step
    assert model.config.sam_image_size == 64
    prepare_checkpoint_root(root)  # what the next run does first: only `best` is left
    assert sorted(p.name for p in root.iterdir()) == ["best"]
