"""The resume manifest of archive jobs: ``OUT/manifest.jsonl``.

One JSON line per finished (scene key, expression-set hash, settings hash) lists the scene's output
files with their sizes. A scene is done when such a line exists **and** every listed file is on
disk with that size. The caller writes the outputs atomically (temp + rename) before recording
them; :meth:`Manifest.record` fsyncs them and their folders, then appends the line, so a line never
points at a partial file, even after a power loss.

Concurrency: appends hold an exclusive ``fcntl.flock`` on ``OUT/manifest.lock``, write one line
with ``O_APPEND`` and ``fsync`` it; readers take a shared lock and only use complete
(newline-terminated) lines that parse. A writer killed mid-line (SIGKILL) leaves a torn last line:
readers ignore it and the next writer ends it with a newline first, so it stays one ignored line.
``flock`` works across processes, and across nodes on NFS (Linux maps it to NFS byte-range locks);
on Lustre/BeeGFS the file system must be mounted with ``flock`` support. On Windows (no
``fcntl``) a ``msvcrt`` byte-range lock is used instead (readers then lock exclusively too).

What is trusted: the manifest is our own file in the output folder. A line naming an absolute path
or one with ``..`` never counts as done (it is not even ``stat``-ed), and invalid lines are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsrefseg.errors import DataError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: msvcrt byte-range lock (exclusive only)
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "Manifest", "ManifestEntry", "content_hash", "remove_temporaries"]

#: File name of the resume manifest in the output folder.
MANIFEST_NAME = "manifest.jsonl"
#: File name of its lock file (next to it).
LOCK_NAME = "manifest.lock"


def content_hash(value: Any) -> str:
    """SHA-256 (hex) of ``value`` as canonical JSON: the key of an expression set or settings."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    """One finished scene as recorded in the manifest."""

    scene: str  # scene key
    expressions: str  # expression-set hash (content_hash of the expression list)
    settings: str  # settings hash (content_hash of the settings that change outputs)
    outputs: tuple[tuple[str, int], ...]  # (path relative to the output folder, size in bytes)
    info: dict[str, Any] = field(default_factory=dict)  # caller's data (e.g. the summary record)


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the leftovers of interrupted atomic writes in ``folder`` (not recursive): hidden
    ``.<name>.<random>.tmp`` files and folders. Call it only for a scene folder this process is
    about to redo (another process's in-flight temporaries would be removed too).
    """
    removed = []
    base = Path(folder)
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """The resume manifest ``folder/manifest.jsonl`` (see the module docstring).

    Reading is incremental: each query reads only what was appended since the previous one.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.lock_path = self.folder / LOCK_NAME
        self.ignored_lines = 0  # torn or invalid lines seen so far
        self._offset = 0
        self._latest: dict[tuple[str, str, str], ManifestEntry] = {}

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            else:  # pragma: no cover - Windows
                while True:
                    try:
                        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
                        break
                    except OSError:
                        continue
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _refresh(self) -> None:
        """Parse the complete lines appended since the last read."""
        if not self.path.is_file():
            return
        with self._locked(exclusive=False), open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # a last line without newline is torn or still being written
        for line in data[:end].splitlines():
            entry = _parse(line)
            if entry is None:
                self.ignored_lines += line.strip() != b""
            else:
                self._latest[(entry.scene, entry.expressions, entry.settings)] = entry
        self._offset += end

    def entries(self) -> list[ManifestEntry]:
        """The latest entry of every (scene, expressions, settings), in first-recorded order."""
        self._refresh()
        return list(self._latest.values())

    def lookup(self, scene: str, expressions: str, settings: str) -> ManifestEntry | None:
        """The latest entry for this (scene key, expression-set hash, settings hash), or ``None``."""
        self._refresh()
        return self._latest.get((scene, expressions, settings))

    def outputs_complete(self, entry: ManifestEntry) -> bool:
        """Whether every output of ``entry`` is on disk, inside the folder, with its recorded size."""
        for relative, size in entry.outputs:
            rel = Path(relative)
            if rel.is_absolute() or ".." in rel.parts:
                return False
            try:
                if (self.folder / rel).stat().st_size != size:
                    return False
            except OSError:
                return False
        return True

    def is_done(self, scene: str, expressions: str, settings: str) -> bool:
        """Whether this scene was finished with these expressions and settings and its outputs are intact."""
        entry = self.lookup(scene, expressions, settings)
        return entry is not None and self.outputs_complete(entry)

    def record(self, scene: str, expressions: str, settings: str,
               outputs: Iterable[str | os.PathLike[str]], info: Mapping[str, Any] | None = None) -> ManifestEntry:
        """Append the line saying this scene is finished; call it after its outputs are written.

        ``outputs`` are the scene's files (absolute, or relative to the output folder); they are
        fsync-ed (with their folders) before the line is appended under the lock.

        Raises:
            ValueError: an output is missing or outside the output folder.
            DataError: the manifest cannot be written.
        """
        root = self.folder.resolve()
        listed, folders = [], set()
        for item in outputs:
            file = Path(item) if Path(item).is_absolute() else self.folder / item
            if not file.is_file():
                raise ValueError(f"output {file} does not exist")
            try:
                relative = file.resolve().relative_to(root)
            except ValueError:
                raise ValueError(f"output {file} is not inside {self.folder}") from None
            _fsync_path(file)
            folders.add(file.resolve().parent)
            listed.append((relative.as_posix(), file.stat().st_size))
        for folder in folders:
            _fsync_path(folder)
        entry = ManifestEntry(scene, expressions, settings, tuple(listed), dict(info or {}))
        line = json.dumps({"v": 1, "scene": scene, "expressions": expressions, "settings": settings,
                           "outputs": [{"path": p, "bytes": n} for p, n in listed], "info": entry.info},
                          ensure_ascii=False, default=str).encode("utf-8") + b"\n"
        try:
            with self._locked(exclusive=True):
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
                try:
                    size = os.fstat(fd).st_size
                    if size and os.lseek(fd, size - 1, os.SEEK_SET) >= 0 and os.read(fd, 1) != b"\n":
                        line = b"\n" + line  # end a torn line left by a killed writer
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot append to the manifest ({exc.strerror or exc})") from exc
        return entry


def _parse(line: bytes) -> ManifestEntry | None:
    """A manifest line as an entry, or ``None`` for a torn or invalid line."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            return None
        outputs = tuple((str(o["path"]), int(o["bytes"])) for o in obj["outputs"])
        fields = (obj["scene"], obj["expressions"], obj["settings"])
        info = obj.get("info") or {}
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if obj.get("v") != 1 or not all(isinstance(f, str) for f in fields) or not isinstance(info, dict):
        return None
    return ManifestEntry(*fields, outputs, info)
