"""Atomic writes: new files get the mode a plain open() gives, failures leave the old file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from rsrefseg.utils import atomic_write_json, atomic_write_text, current_umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "plain.txt", "w") as handle:  # what every other tool does
            handle.write("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o666 & ~umask == _mode(tmp_path / "plain.txt")


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"v": 1})

    class Boom:  # json cannot serialise it: the write fails half-way
        def __str__(self) -> str:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_json(target, {"v": Boom()})
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_remove_stale_temp_files_only_touches_our_names(tmp_path: Path) -> None:
    """What a SIGKILL leaves (temp files of atomic_path, checkpoint/cache temp folders) goes; nothing else."""
    import subprocess
    import sys

    from rsrefseg.utils import atomic_path, remove_stale_temp_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    sub = tmp_path / "overlays"
    sub.mkdir()
    stale = [
        tmp_path / f".metrics.json.{dead_pid}-abc_12xy.tmp",  # atomic_path of a killed process
        tmp_path / ".mask.tif.k2j4h5g6.tmp",  # atomic_path before the pid was in the name
        sub / f".00001.png.{dead_pid}-zzzzzzzz.tmp",
    ]
    stale_dirs = [tmp_path / ".tmp-step-00000120", tmp_path / ".tmp-best", tmp_path / ".old-step-00000120",
                  tmp_path / f".val-64.tmp-{dead_pid}"]
    kept = [
        tmp_path / ".notes.tmp",  # a user's file: not our pattern
        tmp_path / "metrics.json",
        tmp_path / f".summary.json.{os.getpid()}-abcdefgh.tmp",  # a live writer (this process)
        tmp_path / ".x.abc.tmp",  # random part is not 8 characters
        tmp_path / "a.tmp",
    ]
    # .old-step-00000040 without step-00000040: an interrupted swap's only copy, never deleted
    kept_dirs = [tmp_path / "best", tmp_path / "step-00000120", tmp_path / ".tmp-other", tmp_path / ".old-best",
                 tmp_path / ".old-step-00000040"]
    for path in stale + kept:
        path.write_text("x")
    for path in stale_dirs + kept_dirs:
        path.mkdir()
        (path / "model.safetensors").write_text("x")
    link = tmp_path / "elsewhere"
    target = tmp_path.parent / f"{tmp_path.name}-outside"
    target.mkdir()
    (target / f".a.{dead_pid}-abcdefgh.tmp").write_text("x")
    link.symlink_to(target)  # never followed

    assert remove_stale_temp_files(tmp_path) == sorted(stale[:2] + stale_dirs)
    assert stale[2].exists()  # not recursive by default
    assert remove_stale_temp_files(tmp_path, recursive=True) == [stale[2]]
    assert all(p.exists() for p in kept + kept_dirs) and (target / f".a.{dead_pid}-abcdefgh.tmp").exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []
    fresh = tmp_path / f".y.{dead_pid}-abcdefgh.tmp"
    fresh.write_text("x")
    assert remove_stale_temp_files(tmp_path, min_age_s=3600) == []  # too recent: maybe another machine's
    with atomic_path(tmp_path / "z.txt") as tmp:  # our own temp names match the pattern
        assert remove_stale_temp_files(tmp_path, min_age_s=3600) == [] and tmp.exists()
        assert tmp.name.startswith(f".z.txt.{os.getpid()}-")
    assert remove_stale_temp_files(tmp_path) == [fresh]
