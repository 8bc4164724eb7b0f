"""Feature folders in the web demo (``rsrefseg serve --features-root DIR``): scenes encoded once with
``rsrefseg encode``, offered by name in the page and segmented by decoding only.

The page never sends a path: it picks one of the names :func:`list_feature_folders` gives (paths of
feature folders relative to the server's ``DIR``), and :func:`resolve_feature_folder` accepts only
those names. A folder, or any file of it (``index.json``, ``preview.png``, ``windows/*``), that is a
symbolic link leading out of ``DIR`` is neither listed nor opened, so a link planted in ``DIR``
cannot make the server read files elsewhere.

No torch at import; :mod:`rsrefseg.demo_service` opens the folders
(:func:`rsrefseg.inference.features.open_features`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from rsrefseg.errors import ConfigError, DataError, RSRefSegError

__all__ = ["MAX_DEPTH", "MAX_FOLDERS", "folder_key", "list_feature_folders", "resolve_feature_folder", "without_root"]

#: Levels below the root searched for feature folders (``DIR/<scene>``, ``DIR/<run>/<scene>``, ...).
MAX_DEPTH = 3
#: Most feature folders listed (the first ones in sorted order).
MAX_FOLDERS = 1000
#: The file that marks a feature folder (``rsrefseg.inference.feature_files.INDEX_NAME``, torch-free here).
INDEX_NAME = "index.json"


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (links followed) lies in the resolved ``root``."""
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):  # outside, unreadable, or a symlink loop
        return False
    return True


def _contained(folder: Path, root: Path) -> bool:
    """``folder`` and every entry of it (one level into ``windows/``) stay inside ``root``."""
    if not _inside(folder, root):
        return False
    try:
        for entry in os.scandir(folder):
            if not _inside(Path(entry.path), root):
                return False
            if entry.name == "windows" and entry.is_dir():
                if not all(_inside(Path(e.path), root) for e in os.scandir(entry.path)):
                    return False
    except OSError:
        return False
    return True


def list_feature_folders(root: str | os.PathLike[str]) -> list[str]:
    """Names (POSIX paths relative to ``root``, ``"."`` for ``root`` itself) of the feature folders
    under ``root``, sorted, at most :data:`MAX_FOLDERS`, searched :data:`MAX_DEPTH` levels deep (not
    inside a feature folder). Folders with a symbolic link leading out of ``root`` are left out.

    Raises:
        ConfigError: ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"{base}: --features-root is not a folder")
    resolved = base.resolve()
    found: list[str] = []
    level = [base]
    for _ in range(MAX_DEPTH + 1):
        below: list[Path] = []
        for folder in sorted(level):
            if (folder / INDEX_NAME).is_file():
                if _contained(folder, resolved):
                    found.append(folder.relative_to(base).as_posix())
                continue  # nothing is searched inside a feature folder
            try:
                below += [Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")
                          and _inside(Path(e.path), resolved)]
            except OSError:
                continue
        level = below
    return sorted(found)[:MAX_FOLDERS]


def resolve_feature_folder(root: str | os.PathLike[str], name: str) -> Path:
    """The folder of ``name``, one of :func:`list_feature_folders` ``(root)``.

    Raises:
        DataError: ``name`` is not listed (never a path of the caller's choosing).
    """
    if not isinstance(name, str) or name not in list_feature_folders(root):
        shown = str(name)[:80]
        raise DataError(f"{shown}: no such encoded scene on this server (choose one from the list)")
    return Path(root) / name


def folder_key(folder: Path) -> tuple[str, int, int, None]:
    """What identifies an opened feature folder in the demo's cache: its ``index.json`` (resolved
    path, size, modification time; rewritten by every encode), no band choice.

    Raises:
        DataError: the folder went away since it was listed.
    """
    index = folder / INDEX_NAME
    try:
        stat = index.stat()
        return (f"features:{index.resolve()}", stat.st_size, stat.st_mtime_ns, None)
    except OSError:
        raise DataError(f"{folder.name}: the encoded scene is gone (reload the page)") from None


def without_root(exc: RSRefSegError, root: Path | None) -> RSRefSegError:
    """``exc`` with the server's path of ``root`` left out (``ROOT/run/scene/x`` -> ``run/scene/x``):
    the page names an encoded scene by its listed name, never by where the server keeps it."""
    message = str(exc)
    if root is not None:
        for full in sorted({str(root.resolve()), str(root.absolute()), str(root)}, key=len, reverse=True):
            message = message.replace(full + os.sep, "").replace(full, root.resolve().name)
    if message == str(exc):
        return exc
    renamed = copy.copy(exc)
    renamed.args = (message,)
    return renamed
