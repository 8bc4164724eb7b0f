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
