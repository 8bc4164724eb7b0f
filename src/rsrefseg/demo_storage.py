"""Where ``rsrefseg serve`` keeps uploads and results, and when they are deleted.

- :class:`PrivateFolder`: a new folder of the server's own, ``rsrefseg-serve-XXXXXXXX`` (mode 0700,
  random name, made by :func:`tempfile.mkdtemp`) in ``--workdir`` or the system temp folder
  (``$TMPDIR``, usually ``/tmp``). Gradio is pointed at it (``GRADIO_TEMP_DIR``), so uploads, previews
  and results never land in Gradio's shared ``/tmp/gradio``. It is deleted when the server stops
  (Ctrl+C, SIGTERM, SIGHUP, interpreter exit); a folder left by a server that was killed (SIGKILL,
  power loss) is deleted by the next start in the same place: a live server holds a lock
  (``flock``) on ``.lock`` inside its folder, a dead one does not.
- :class:`SessionFiles`: which uploads and result folders belong to which browser session; they are
  deleted when the session ends (Gradio's ``unload`` event: the tab is closed or reloaded) or after
  :data:`SESSION_IDLE_S` seconds without a request, and all of them when the server stops (after
  waiting for the requests in progress).

Nothing here imports Gradio: the page (:mod:`rsrefseg.app`) calls these methods.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rsrefseg.errors import ConfigError

__all__ = ["FOLDER_PREFIX", "SESSION_IDLE_S", "PrivateFolder", "SessionFiles", "remove_stale_folders"]

#: Name prefix of the server folders (how a later start recognises a stale one).
FOLDER_PREFIX = "rsrefseg-serve-"
#: Lock file inside a server folder, held (``flock``) while the server runs.
LOCK_NAME = ".lock"
#: A server folder without a lock file is only taken for stale after this many seconds (a starting
#: server creates the lock right after the folder).
UNLOCKED_GRACE_S = 600.0
#: A session's files are deleted after this many seconds without a request (sessions whose tab was
#: closed are cleaned at once; this catches API clients that never say goodbye).
SESSION_IDLE_S = 3600.0
#: Gradio leaves an empty ``tmpXXXXXXXX`` file in its folder per file input it preprocesses (gradio
#: 6.31, ``gr.File(type="filepath")``); :meth:`SessionFiles.sweep` deletes those older than this.
LEFTOVER_AGE_S = 60.0
#: Seconds :meth:`SessionFiles.close` waits for requests in progress before deleting their files.
CLOSE_WAIT_S = 30.0


def _try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting (True when taken; always True without fcntl)."""
    try:
        import fcntl
    except ModuleNotFoundError:  # pragma: no cover - not POSIX: no stale-folder detection
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def remove_stale_folders(parent: Path) -> list[Path]:
    """Delete the server folders in ``parent`` whose server is gone; return them.

    Only directories named ``rsrefseg-serve-*`` owned by this user are considered: one whose lock
    nobody holds, or that has no lock file and is older than :data:`UNLOCKED_GRACE_S`.
    """
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        if not entry.name.startswith(FOLDER_PREFIX):
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
            continue
        lock = entry / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if time.time() - info.st_mtime > UNLOCKED_GRACE_S:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            continue
        except OSError:
            continue
        try:
            if _try_lock(fd):  # nobody holds it: its server is gone
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        finally:
            os.close(fd)
    return removed


def _remove_folder(path: Path, fd: int | None) -> None:
    """Delete ``path`` and release its lock (finaliser of :class:`PrivateFolder`)."""
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


class PrivateFolder:
    """A new folder of the server's own (0700), deleted by :meth:`close` or at interpreter exit.

    Args:
        parent: Where to make it (created if missing); default: the system temp folder. Stale server
            folders found there are deleted first (see :func:`remove_stale_folders`).

    Raises:
        ConfigError: ``parent`` cannot be created or written (the message names it).
    """

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        try:
            base.mkdir(parents=True, exist_ok=True)
            remove_stale_folders(base)
            self.path = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=base)).resolve()  # mode 0700
        except OSError as exc:
            raise ConfigError(f"{base}: cannot create the server's work folder ({exc.strerror or exc})") from None
        fd = os.open(self.path / LOCK_NAME, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
        _try_lock(fd)
        self._finalizer = weakref.finalize(self, _remove_folder, self.path, fd)

    def use_for_gradio(self) -> None:
        """Point Gradio's upload/cache folder at this folder (``GRADIO_TEMP_DIR``; read by Gradio when a
        page is built and when a server starts, so call it before both)."""
        os.environ["GRADIO_TEMP_DIR"] = str(self.path)

    @property
    def closed(self) -> bool:
        """Whether the folder has been deleted."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Delete the folder and everything in it (idempotent)."""
        self._finalizer()

    def __enter__(self) -> PrivateFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Session:
    """The files of one browser session."""

    folder: Path  # result folders and previews of this session
    uploads: set[Path] = field(default_factory=set)  # uploaded files (in Gradio's folder) it used
    last_seen: float = field(default_factory=time.monotonic)
    active: int = 0  # requests in progress
    ended: bool = False  # the session ended while a request was in progress: clean up after it


def _session_key(session: str | None) -> str:
    """A file-name-safe key for a session id chosen by the client (never used as a path itself)."""
    return hashlib.sha256((session or "").encode("utf-8", "surrogatepass")).hexdigest()[:24]


class SessionFiles:
    """Per-session bookkeeping of the files under ``root`` (the server's :class:`PrivateFolder`).

    Uploads are deleted only when they lie under ``root`` and no other live session uses the same
    file (Gradio stores identical uploads once). All methods are thread-safe.

    Args:
        root: The server's own folder (uploads live in Gradio's hash folders directly under it).
        idle_s: Sessions without a request for this long are ended by :meth:`sweep`.
    """

    def __init__(self, root: str | os.PathLike[str], idle_s: float = SESSION_IDLE_S) -> None:
        self.root = Path(root).resolve()
        self.runs = self.root / "runs"
        self.idle_s = idle_s
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._closed = False

    def _get(self, session: str | None) -> _Session:
        """The session's record, created on first use (call with the lock held)."""
        key = _session_key(session)
        record = self._sessions.get(key)
        if record is None:
            record = self._sessions[key] = _Session(self.runs / key)
        record.last_seen = time.monotonic()
        return record

    @contextmanager
    def request(self, session: str | None, *uploads: str | os.PathLike[str] | None) -> Iterator[Path]:
        """Mark a request of ``session`` in progress; yield the session's output folder (created, 0700).

        ``uploads``: the uploaded files the request uses (remembered, deleted with the session).

        Raises:
            ConfigError: the server is shutting down.
        """
        with self._lock:
            if self._closed:
                raise ConfigError("the server is shutting down; try again later")
            record = self._get(session)
            for upload in uploads:
                if upload:
                    path = Path(upload).resolve()
                    if path.is_relative_to(self.root) and not path.is_relative_to(self.runs):
                        record.uploads.add(path)
            record.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            record.active += 1
            self._active += 1
        try:
            yield record.folder
        finally:
            with self._lock:
                record.active -= 1
                record.last_seen = time.monotonic()
                self._active -= 1
                self._idle.notify_all()
                finish = record.ended and record.active == 0
            if finish:
                self._end(_session_key(session))

    def sessions(self) -> int:
        """Number of sessions with files."""
        with self._lock:
            return len(self._sessions)

    def end(self, session: str | None) -> list[Path]:
        """Delete the files of ``session`` (its output folder, and the uploads no other session uses);
        return the deleted uploads."""
        return self._end(_session_key(session)) or []

    def sweep(self, now: float | None = None) -> int:
        """End the sessions without a request for more than ``idle_s`` (and none in progress); return
        how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [key for key, record in self._sessions.items() if now - record.last_seen > self.idle_s]
        self._remove_leftovers()
        return sum(1 for key in idle if self._end(key, idle_since=now - self.idle_s) is not None)

    def _remove_leftovers(self, min_age_s: float = LEFTOVER_AGE_S) -> None:
        """Delete Gradio's empty ``tmp*`` files in ``root`` older than ``min_age_s`` (an upload in
        progress writes to such a file too, but it is not empty for long)."""
        limit = time.time() - min_age_s
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for entry in entries:
            try:
                if (entry.name.startswith("tmp") and entry.is_file(follow_symlinks=False)
                        and entry.stat().st_size == 0 and entry.stat().st_mtime < limit):
                    os.unlink(entry.path)
            except OSError:
                continue

    def _end(self, key: str, idle_since: float | None = None) -> list[Path] | None:
        """Forget session ``key`` and delete its files (only if it was last seen before ``idle_since``
        and has no request in progress, when given); the deleted uploads, or None if nothing was done."""
        with self._lock:
            record = self._sessions.get(key)
            if record is None or (idle_since is not None and (record.active or record.last_seen > idle_since)):
                return None
            if record.active:  # a request still writes there: the last one to finish cleans up
                record.ended = True
                return []
            del self._sessions[key]
            in_use = set().union(*(other.uploads for other in self._sessions.values()))
        shutil.rmtree(record.folder, ignore_errors=True)
        deleted = []
        for upload in sorted(record.uploads - in_use):
            try:
                upload.unlink()
                deleted.append(upload)
            except OSError:  # already gone; anything else goes at shutdown with the whole folder
                continue
            if upload.parent != self.root:
                try:
                    upload.parent.rmdir()  # Gradio's per-upload hash folder, once empty
                except OSError:
                    pass
        return deleted

    def close(self, wait_s: float = CLOSE_WAIT_S) -> bool:
        """Refuse new requests, wait up to ``wait_s`` for those in progress, then delete every session's
        files. Returns whether all requests had finished."""
        with self._lock:
            self._closed = True
            finished = self._idle.wait_for(lambda: self._active == 0, timeout=wait_s)
            keys = list(self._sessions)
        for key in keys:
            self._end(key)
        shutil.rmtree(self.runs, ignore_errors=True)
        return finished
