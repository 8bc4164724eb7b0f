"""Downloading public data files: resumable HTTP(S) fetches with checksums, and safe zip reading.

Nothing here runs at import. :func:`fetch` downloads one file to ``<dest>.part``, resuming an
interrupted transfer with an HTTP ``Range`` request, checks the published MD5 and only then renames
it to ``dest``; a file already at ``dest`` with the right checksum is not downloaded again.
:func:`extract_members` copies chosen members of a zip archive to names *we* choose (never a path
taken from the archive), refusing symbolic links, oversized and duplicate members. Errors are
:class:`DownloadError` with one line naming the URL or file (the CLI prints ``error: ...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rsrefseg.errors import DataError

#: ``on_progress(stage, done, total)``: bytes or files done so far; total None when unknown.
ProgressFn = Callable[[str, int, "int | None"], None]
#: Bytes per read from the network or an archive.
CHUNK = 1 << 20
#: Seconds without a byte from the server before a download counts as interrupted.
TIMEOUT_S = 60.0
USER_AGENT = "rsrefseg-data-download/1 (python urllib)"


class DownloadError(DataError):
    """A download or archive failed (unreachable, interrupted, wrong checksum, unsafe member)."""


class DownloadInterrupted(DownloadError):
    """The transfer stopped mid-file; the partial file is kept and the next run resumes it."""


@dataclass(frozen=True)
class Source:
    """One published file: where it lives, its MD5 and an upper bound on its size.

    Attributes:
        name: file name on disk (inside the downloads folder).
        urls: mirrors, tried in order until one answers.
        md5: the published MD5 (hex); the file is used only when it matches.
        max_bytes: refuse anything larger (a wrong URL or a hostile server cannot fill the disk).
    """

    name: str
    urls: tuple[str, ...]
    md5: str
    max_bytes: int


def md5_of(path: Path) -> str:
    """Hex MD5 of a file (read in chunks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s), and never from https down to plain http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise DownloadError(f"{req.full_url}: refused redirect to {newurl} (only https, or http from http)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http:// and https:// URLs can be downloaded")
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    opener = urllib.request.build_opener(_SafeRedirects())
    return opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)  # type: ignore[return-value]


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _download(url: str, part: Path, max_bytes: int, stage: str, on_progress: ProgressFn | None) -> None:
    """Append the rest of ``url`` to ``part`` (from its current size when the server allows ranges)."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        response = _open(url, offset)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the partial file may be complete
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {url}: {reason}") from None
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        mode = "ab"
        if status == 206:
            match = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{url}: the server answered the resume request with a wrong range "
                                    f"({response.headers.get('Content-Range')!r}); delete {part} and run again")
        elif status == 200:
            offset, mode = 0, "wb"  # no range support (or a fresh start): from the beginning
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status}")
        total = offset + remaining if remaining is not None else None
        if total is not None and total > max_bytes:
            raise DownloadError(f"{url}: {total} bytes announced, more than the {max_bytes} expected at most")
        done = offset
        with part.open(mode) as handle:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, OSError) as exc:  # connection closed or timed out mid-file
                    size = f" of {total}" if total is not None else ""
                    raise DownloadInterrupted(f"{url}: download interrupted after {done}{size} bytes "
                                              f"({type(exc).__name__}); run the command again to resume it") from None
                if not block:
                    break
                done += len(block)
                if done > max_bytes:
                    raise DownloadError(f"{url}: more than {max_bytes} bytes, more than expected; stopped")
                handle.write(block)  # a full disk raises OSError here: reported by the caller as a file error
                if on_progress is not None:
                    on_progress(stage, done, total)
        if total is not None and done < total:
            raise DownloadInterrupted(f"{url}: download interrupted after {done} of {total} bytes; "
                                "run the command again to resume it")


def fetch(source: Source, folder: Path, on_progress: ProgressFn | None = None) -> Path:
    """Download ``source`` into ``folder`` (resuming ``<name>.part``), verify its MD5, return its path.

    A file already at ``folder/name`` whose MD5 matches is returned without a download.

    Raises:
        DownloadError: every mirror failed (the last failure named), the transfer was interrupted
            (the partial file is kept for the next run), or the checksum does not match (the file is
            deleted, so the next run starts over).
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest, part = folder / source.name, folder / f"{source.name}.part"
    if dest.is_file():
        if md5_of(dest) == source.md5:
            return dest
        dest.unlink()  # a stale or damaged earlier download
    errors: list[str] = []
    for url in source.urls:
        try:
            _download(url, part, source.max_bytes, source.name, on_progress)
        except DownloadInterrupted:
            raise  # resumable: keep the partial file and let the user run again
        except DownloadError as exc:
            errors.append(str(exc))
            continue
        got = md5_of(part)
        if got != source.md5:
            part.unlink()
            raise DownloadError(f"{url}: checksum mismatch (MD5 {got}, expected {source.md5}); the download "
                                "was deleted and nothing was extracted")
        os.replace(part, dest)
        return dest
    raise DownloadError(errors[-1] if len(errors) == 1 else f"every mirror failed: {'; '.join(errors)}")


# ---------------------------------------------------------------------- archives
def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def extract_members(
    archive: Path,
    pick: Callable[[str], str | None],
    dest: Path,
    max_member_bytes: int,
    on_progress: ProgressFn | None = None,
    max_total_bytes: int | None = None,
) -> list[str]:
    """Copy the members of a zip archive that ``pick`` names into ``dest``; returns the names written.

    ``pick(member_name)`` returns the output file name (a plain name, no folder) or None to skip the
    member. Output paths are never built from archive paths, so ``../`` or absolute member names
    cannot escape ``dest``. Members that are symbolic links, larger than ``max_member_bytes`` (as
    declared or as actually decompressed) or mapped twice to one name are refused, and so is a
    selection declaring more than ``max_total_bytes`` in all; the zip CRC of every copied member is
    checked.
    """
    written: list[str] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            chosen = [(info, pick(info.filename.replace("\\", "/"))) for info in zf.infolist() if not info.is_dir()]
            chosen = [(info, name) for info, name in chosen if name is not None]
            total = sum(info.file_size for info, _ in chosen)
            if max_total_bytes is not None and total > max_total_bytes:
                raise DownloadError(f"{archive}: the chosen members hold {total} bytes, more than "
                                    f"{max_total_bytes}; refused")
            seen: set[str] = set()
            for k, (info, name) in enumerate(chosen):
                if name in seen:
                    raise DownloadError(f"{archive}: two members give {name} (second: {info.filename!r})")
                seen.add(name)
                if "/" in name or "\\" in name or name in ("", ".", ".."):
                    raise DownloadError(f"{archive}: bad output name {name!r} for member {info.filename!r}")
                if _is_link(info):
                    raise DownloadError(f"{archive}: member {info.filename!r} is a symbolic link; refused")
                if info.file_size > max_member_bytes:
                    raise DownloadError(f"{archive}: member {info.filename!r} is {info.file_size} bytes, "
                                        f"more than {max_member_bytes}; refused")
                _copy_member(zf, info, dest / name, max_member_bytes, archive)
                written.append(name)
                if on_progress is not None:
                    on_progress("extract", k + 1, len(chosen))
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archive}: not a valid zip archive ({exc})") from None
    return written


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limit: int, archive: Path) -> None:
    size = 0
    with zf.open(info) as src, target.open("wb") as out:  # zipfile checks the CRC at the end
        for block in iter(lambda: src.read(CHUNK), b""):
            size += len(block)
            if size > limit:  # a member whose header lies about its size
                raise DownloadError(f"{archive}: member {info.filename!r} decompresses to more than {limit} bytes")
            out.write(block)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created) or fail at once if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(f"{path.parent}: another download into this folder is running") from None
        yield
    finally:
        handle.close()

