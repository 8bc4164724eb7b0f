"""Progress of long commands: a tqdm bar for people, JSON lines for programs (the QGIS plugin).

``--progress bar`` (default) draws tqdm bars on stderr, ``--progress json`` writes one JSON object
per line on stderr instead, ``--progress none`` (or ``--quiet``) nothing. A JSON line looks like::

    {"event": "progress", "stage": "images", "done": 3, "total": 20, "fraction": 0.15, "message": "scene.tif"}

and a command may add ``{"event": "done", ...}`` at the end. Error lines stay ``error: ...``
(plain text, one line), so a reader tells them apart by the first character (``{`` or not).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

#: Progress styles by name.
PROGRESS_STYLES = ("bar", "json", "none")


def add_progress_args(p: argparse.ArgumentParser) -> None:
    """``--progress bar|json|none`` and ``--quiet`` (= ``--progress none``)."""
    p.add_argument("--progress", choices=PROGRESS_STYLES, default="bar",
                   help="progress display: tqdm bars (default), JSON lines on stderr for programs, or none")
    p.add_argument("--quiet", action="store_true", help="no progress display (same as --progress none)")


def progress_style(args: argparse.Namespace) -> str:
    """The style chosen by :func:`add_progress_args` (``--quiet`` wins)."""
    return "none" if getattr(args, "quiet", False) else str(getattr(args, "progress", "bar"))


def emit(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    """Write one JSON progress line (``{"event": event, **fields}``) and flush."""
    out = stream if stream is not None else sys.stderr
    out.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    out.flush()


class JsonProgress:
    """An iterator wrapper like tqdm's that writes a JSON line per step (see the module docstring)."""

    def __init__(self, iterable: Iterable[Any], total: int | None, stage: str,
                 stream: TextIO | None = None) -> None:
        self.iterable, self.total, self.stage, self.stream = iterable, total, stage, stream
        self.message = ""

    def set_message(self, message: str) -> None:
        """Text sent with the following lines (e.g. the current file)."""
        self.message = message

    def __iter__(self) -> Iterator[Any]:
        done = 0
        self._line(done)
        for item in self.iterable:
            yield item
            done += 1
            self._line(done)

    def _line(self, done: int) -> None:
        fraction = None if not self.total else round(min(1.0, done / self.total), 6)
        emit("progress", self.stream, stage=self.stage, done=done, total=self.total, fraction=fraction,
             message=self.message)


def progress(iterable: Iterable[Any], style: str, total: int | None = None, desc: str = "",
             **tqdm_kwargs: Any) -> Iterable[Any]:
    """Wrap ``iterable`` for ``style`` (``bar``: tqdm with ``desc``; ``json``: :class:`JsonProgress`
    with stage ``desc``; ``none``: unchanged)."""
    if style == "json":
        return JsonProgress(iterable, total, desc)
    if style == "none":
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **tqdm_kwargs)
