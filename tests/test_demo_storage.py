"""Tests of rsrefseg.demo_storage: the server's own folder and per-session deletion (no Gradio, no model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rsrefseg.demo_storage import LOCK_NAME, PrivateFolder, SessionFiles, remove_stale_folders
from rsrefseg.errors import ConfigError

HOLD = ("import sys, time; from rsrefseg.demo_storage import PrivateFolder; "
        "f = PrivateFolder(sys.argv[1]); print(f.path, flush=True); {rest}")


def _spawn(parent: Path, rest: str) -> tuple[subprocess.Popen[str], Path]:
    """A Python process that makes a server folder in ``parent`` and then runs ``rest``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(rest=rest), str(parent)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_private_folder_is_0700_locked_and_deleted(tmp_path: Path) -> None:
    folder = PrivateFolder(tmp_path / "parent")
    assert folder.path.parent == (tmp_path / "parent").resolve() and folder.path.name.startswith("rsrefseg-serve-")
    assert folder.path.stat().st_mode & 0o777 == 0o700 and (folder.path / LOCK_NAME).is_file()
    (folder.path / "sub").mkdir()
    (folder.path / "sub" / "upload.png").write_bytes(b"x")
    assert remove_stale_folders(folder.path.parent) == []  # its lock is held: not stale
    folder.close()
    folder.close()  # idempotent
    assert folder.closed and not folder.path.exists() and list((tmp_path / "parent").iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"^{blocker / 'sub'}: cannot create the server's work folder"):
        PrivateFolder(blocker / "sub")


def test_folders_of_dead_servers_are_removed_by_the_next_start(tmp_path: Path) -> None:
    """SIGKILL leaves the folder; the next start in the same place removes it, never a live server's
    folder, a recent unlocked one, or anything not named like ours. A normal exit removes its own."""
    killed, killed_path = _spawn(tmp_path, "time.sleep(120)")
    live, live_path = _spawn(tmp_path, "time.sleep(120)")
    exited, exited_path = _spawn(tmp_path, "pass")  # exits without close(): removed at interpreter exit
    try:
        assert exited.wait(30) == 0 and not exited_path.exists()
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert killed_path.is_dir()  # SIGKILL: nothing could clean up
        fresh = tmp_path / "rsrefseg-serve-nolock1"  # made by a server that is just starting
        fresh.mkdir()
        old = tmp_path / "rsrefseg-serve-nolock2"
        old.mkdir()
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        other = tmp_path / "someone-else"
        other.mkdir()
        new = PrivateFolder(tmp_path)
        assert not killed_path.exists() and not old.exists()
        assert live_path.is_dir() and fresh.is_dir() and other.is_dir() and new.path.is_dir()
        new.close()
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait()


def _upload(root: Path, name: str, folder: str) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"image")
    return path


def test_sessions_delete_their_own_files_only(tmp_path: Path) -> None:
    root = tmp_path / "server"
    sessions = SessionFiles(root)
    shared = _upload(root, "same.png", "hash1")  # Gradio stores an identical upload once
    only_a = _upload(root, "a.png", "hash2")
    outside = tmp_path / "user.png"
    outside.write_bytes(b"mine")
    with sessions.request("a", shared, only_a, outside) as folder_a:
        (folder_a / "run-1").mkdir()
        assert folder_a.parent == sessions.runs and folder_a.stat().st_mode & 0o777 == 0o700
    with sessions.request("b", shared, None) as folder_b:
        assert folder_b != folder_a
    assert sessions.sessions() == 2
    assert sessions.end("a") == [only_a.resolve()]
    assert not folder_a.exists() and not only_a.parent.exists()  # its hash folder too, once empty
    assert shared.is_file() and outside.is_file() and folder_b.is_dir()
    assert sessions.end("a") == []  # unknown / already ended
    assert sessions.end("b") == [shared.resolve()] and not shared.exists() and outside.is_file()


def test_idle_sessions_and_gradio_leftovers_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "server"
    sessions = SessionFiles(root, idle_s=100)
    upload = _upload(root, "a.png", "h")
    with sessions.request("idle", upload) as idle_folder:
        pass
    with sessions.request("busy") as busy_folder:
        assert sessions.sweep(now=time.monotonic() + 1000) == 1  # "busy" has a request in progress
        assert not idle_folder.exists() and not upload.exists() and busy_folder.is_dir()
    old_leftover, new_leftover, not_empty = root / "tmpold", root / "tmpnew", root / "tmpdata"
    for path in (old_leftover, new_leftover, not_empty):
        path.write_bytes(b"" if path is not not_empty else b"x")
    for path in (old_leftover, not_empty):
        os.utime(path, (time.time() - 600, time.time() - 600))
    assert sessions.sweep() == 0
    assert not old_leftover.exists() and new_leftover.exists() and not_empty.exists()


def test_a_session_ending_during_a_request_is_cleaned_after_it(tmp_path: Path) -> None:
    sessions = SessionFiles(tmp_path / "server")
    with sessions.request("a") as folder:
        assert sessions.end("a") == []  # the tab closed while its run still writes
        (folder / "late.png").write_bytes(b"x")
        assert folder.is_dir()
    assert not folder.exists() and sessions.sessions() == 0


def test_close_waits_for_requests_then_deletes_everything(tmp_path: Path) -> None:
    sessions = SessionFiles(tmp_path / "server")
    started, release = threading.Event(), threading.Event()
    written: list[Path] = []

    def request() -> None:
        with sessions.request("a") as folder:
            started.set()
            release.wait(10)
            written.append(folder / "out.png")
            written[0].write_bytes(b"x")

    worker = threading.Thread(target=request)
    worker.start()
    started.wait(10)
    threading.Timer(0.3, release.set).start()
    assert sessions.close(wait_s=10) is True  # waited for the request in progress
    worker.join(10)
    assert written and not written[0].exists() and not sessions.runs.exists()
    with pytest.raises(ConfigError, match="shutting down"):
        with sessions.request("b"):
            pass
