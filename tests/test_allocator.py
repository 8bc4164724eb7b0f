"""glibc malloc settings of the rsrefseg command: freed blocks are reused instead of page-faulted again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from rsrefseg import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# As a decoded window does: allocate and fill four 16 MiB arrays, free them, 10 times; print the
# minor page faults of the rounds after the first.
_FAULTS = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from rsrefseg.allocator import retain_freed_memory
    print(retain_freed_memory(), file=sys.stderr)
def round_():
    blocks = [np.ones(4 << 20, dtype=np.float32) for _ in range(4)]  # 16 MiB each, every page written
    del blocks
round_()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> int:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.ENV}
    run_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                         env=run_env, timeout=120)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="the settings apply to glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    pages = 4 * (16 << 20) // os.sysconf("SC_PAGE_SIZE")  # pages of one round
    default = _faults("default")
    tuned = _faults("tuned")
    # glibc's defaults give freed blocks back (trimmed off the heap top, or unmapped): pages fault in
    # again round after round (20,460 faults in 10 rounds here, 2026-12-03).
    assert default >= pages, default
    # Retained: the pages stay mapped after the first round (0 here).
    assert tuned <= pages // 16, tuned
    # The opt-out and the user's own glibc variables keep the defaults.
    assert _faults("tuned", {allocator.ENV: "system"}) >= pages
    assert _faults("tuned", {"MALLOC_TRIM_THRESHOLD_": str(128 << 10)}) >= pages


def test_what_was_done_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.retain_freed_memory() == f"system defaults ({allocator.ENV}=system)"
    monkeypatch.delenv(allocator.ENV)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.retain_freed_memory() == "system (MALLOC_MMAP_THRESHOLD_ set by the user)"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator.retain_freed_memory() == "system defaults (not glibc)"


def test_the_command_applies_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from rsrefseg.cli import main as cli

    calls: list[int] = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or "recorded")
    assert cli.main([]) == 2  # no sub-command: help, status 2
    assert calls == [1]
    assert "usage: rsrefseg" in capsys.readouterr().out
