"""Small shared helpers: atomic file writes, and the clean-up of what a killed writer left.

Temporary names of this package (and only these are ever removed by
:func:`remove_stale_temp_files`):

- ``.<name>.<pid>-<random>.tmp`` files of :func:`atomic_path` (``.<name>.<random>.tmp`` before
  the pid was part of the name);
- ``.tmp-step-<8 digits>``, ``.tmp-best``, ``.old-step-<8 digits>`` folders of training checkpoints
  (``rsrefseg.training.state``);
- ``.<name>.tmp-<pid>`` folders of the training image cache (``rsrefseg.training.data``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from rsrefseg.errors import OutputError, RSRefSegError


def current_umask() -> int:
    """The process's umask: from ``/proc/self/status`` on Linux (no change to the process state,
    safe with threads), elsewhere by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left exactly as it was, so a
    crash never leaves a half-written file behind.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name tells remove_stale_temp_files whether the writer may still be alive.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
        try:
            # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(target, exc) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, RSRefSegError):
            raise write_error(target, exc) from exc
        raise


def write_error(target: str | os.PathLike[str], exc: OSError) -> OutputError:
    """The one-line :class:`OutputError` for a failed write of ``target`` (disk full, I/O error...)."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    code = f" [errno {exc.errno}]" if exc.errno else ""
    return OutputError(f"{target}: cannot write ({reason}{code}); any previous file there is unchanged",
                       exc.errno)


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Check, without creating anything, that ``path`` can be (or is) a folder we can write into.

    Raises :class:`OutputError` naming ``flag`` and the path when ``path`` is an existing file, lies
    under a file, or when its nearest existing folder refuses a new file (permissions, a read-only
    file system). The probe is an unnamed temporary file (``O_TMPFILE`` where supported), so nothing
    is left behind even if the process dies.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {target}: exists and is not a folder")
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {target}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"{flag} {target}: cannot write in {probe} ({reason})", exc.errno) from None
    return target


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def atomic_save(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


#: ``.<name>.[<pid>-]<8 chars of mkstemp>.tmp``: a file of :func:`atomic_path`.
_ATOMIC_TMP = re.compile(r"^\..+\.(?:(?P<pid>\d+)-)?[a-z0-9_]{8}\.tmp$")
#: Folders of a checkpoint being written (``.tmp-step-*``, ``.tmp-best``) or swapped out (``.old-step-*``).
_CHECKPOINT_TMP = re.compile(r"^\.(?:tmp-(?:step-\d{8}|best)|old-step-\d{8})$")
#: ``.<name>.tmp-<pid>``: a folder of the training image cache being written.
_CACHE_TMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: keep the file
    return True


def _is_stale(entry: os.DirEntry[str], min_age_s: float, now: float) -> bool:
    """Whether ``entry`` has one of our temporary names and its writer is gone."""
    is_dir = entry.is_dir(follow_symlinks=False)
    is_file = entry.is_file(follow_symlinks=False)
    match = _ATOMIC_TMP.match(entry.name) if is_file else None
    if match is None and is_dir:
        match = _CHECKPOINT_TMP.match(entry.name) or _CACHE_TMP.match(entry.name)
    if match is None:
        return False
    if entry.name.startswith(".old-") and not os.path.lexists(os.path.join(os.path.dirname(entry.path),
                                                                          entry.name[len(".old-"):])):
        return False  # a swap was interrupted: this is the only copy (rsrefseg.training.state restores it)
    pid = match.groupdict().get("pid")
    if pid is not None and _pid_alive(int(pid)):
        return False
    if min_age_s > 0:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                return False
        except OSError:
            return False
    return True


def remove_stale_temp_files(
    folder: str | os.PathLike[str], recursive: bool = False, min_age_s: float = 0.0
) -> list[Path]:
    """Delete the temporary files and folders of OUR naming that a killed writer left in ``folder``.

    Only the names listed in this module's docstring are touched; anything else (a user's
    ``.foo.tmp``, ``best``, ``step-*``) is never deleted. A temporary file whose name carries the
    pid of a process still running on this machine is kept (a concurrent writer). ``min_age_s``
    also keeps entries modified less than that many seconds ago (for writers on other machines
    sharing the folder). ``recursive`` descends into sub-folders (never through symlinks, never
    into the removed folders). A missing folder is not an error. Returns the removed paths.
    """
    root = Path(folder)
    removed: list[Path] = []
    now = time.time()
    pending = [root]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            path = Path(entry.path)
            if _is_stale(entry, min_age_s, now):
                try:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except OSError:  # gone meanwhile, or not ours to delete (permissions): leave it
                    continue
                removed.append(path)
            elif recursive and entry.is_dir(follow_symlinks=False):
                pending.append(path)
    return sorted(removed)
