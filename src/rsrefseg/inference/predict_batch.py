"""``rsrefseg predict`` over many scenes: shards, resume manifest, summary.json, merged vectors.

:func:`run_batch` processes the scenes of this process (rank ``r`` of ``world`` takes scenes
``r::world``) with :func:`~rsrefseg.inference.predict_job.process_image`:

- every finished scene is recorded in ``OUT/manifest.jsonl``
  (:class:`~rsrefseg.inference.manifest.Manifest`: scene key, expression-set hash, settings hash,
  its files with their sizes; file-locked, safe with several processes and nodes); with
  ``resume=True`` a scene already recorded with the same expressions and settings, whose files are
  intact, is skipped (its summary entry is taken from the manifest, marked ``"resumed": true``);
  anything else, including a scene interrupted half-way, is redone (its folder's temporaries
  removed first);
- a failing scene is listed under ``failures`` and does not stop the others;
- :class:`SummaryFile` keeps ``summary.json`` (``summary.rank<r>.json`` per process under a
  multi-process launch, merged by the main process after a barrier) in step with the files on disk:
  rewritten when a scene ends, after an expression's files (at most every ``interval`` seconds)
  and on an interrupt (SIGINT, or SIGTERM turned into one by the CLI);
- ``merge=FILE``: the main process collects the vector files of every scene into one layer
  (:func:`~rsrefseg.inference.vectors.merge_vectors`), reprojected to ``merge_crs`` (default: the
  first scene's CRS).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsrefseg.errors import DataError, RSRefSegError

__all__ = ["BatchPlan", "SummaryFile", "checkpoint_fingerprint", "prepare_output_folder", "remove_stale_temp_files",
           "run_batch"]

#: Temporary files of ``rsrefseg.utils.atomic_path``: ``.<target>.[<pid>-]<8 random chars>.tmp``.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?:\d+-)?[a-z0-9_]{8}\.tmp$")


def prepare_output_folder(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` and check that files can be created in it (before the model is loaded).

    Raises:
        DataError: ``out`` is an existing file, cannot be created, or is not writable.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: --out exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    try:  # a real write: os.access is wrong for root, read-only mounts and some network file systems
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DataError(f"{folder}: the output folder is not writable ({exc.strerror or exc})") from None
    return folder


def remove_stale_temp_files(folder: str | os.PathLike[str], targets: set[str]) -> list[Path]:
    """Remove temporary files of our naming (``.<target>.<random>.tmp``) for the given target file
    names in ``folder``, left by a killed run (only targets this process owns: under a multi-process
    launch the output root is shared)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and match["target"] in targets and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def checkpoint_fingerprint(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a checkpoint for the resume manifest: its resolved path and the size and
    modification time of its files (a retrained checkpoint at the same path is another one)."""
    folder = Path(checkpoint).resolve()
    files = {}
    for name in ("config.json", "model.safetensors"):
        try:
            stat = (folder / name).stat()
            files[name] = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            files[name] = None
    return {"path": str(folder), "files": files}


class SummaryFile:
    """``summary.json`` of a run, rewritten so that it lists what is on disk (module docstring)."""

    def __init__(self, path: str | os.PathLike[str], summary: dict[str, Any], interval: float = 2.0) -> None:
        self.path, self.summary, self.interval = Path(path), summary, interval
        self._last = 0.0
        self._current: dict[str, Any] | None = None

    def write(self) -> None:
        """Write it now (outputs counted, peak memory updated)."""
        from rsrefseg.inference.outputs import peak_rss_mb, write_summary

        self.summary["outputs"] = sum(len(r["outputs"]) for r in self.summary["images"])
        self.summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
        write_summary(self.path, self.summary)
        self._last = time.monotonic()

    def begin_image(self, record: dict[str, Any]) -> None:
        """An image starts: listed (incomplete) from now on."""
        record.update(complete=False, outputs=[])
        self._current = record
        self.summary["images"].append(record)

    def output_written(self, output: dict[str, Any]) -> None:
        """One expression's files exist: list them (rewrite at most every ``interval`` seconds)."""
        assert self._current is not None
        self._current["outputs"].append(output)
        if time.monotonic() - self._last >= self.interval:
            self.write()

    def end_image(self, **fields: Any) -> None:
        """The current image is complete."""
        assert self._current is not None
        self._current.update(fields, complete=True)
        self._current = None
        self.write()

    def add_resumed(self, record: dict[str, Any]) -> None:
        """A scene finished by an earlier run (from the manifest)."""
        self.summary["images"].append({**record, "resumed": True})

    def fail_image(self, failure: dict[str, Any]) -> None:
        """The current image failed: its entry moves to ``failures`` with the outputs it has."""
        if self._current is not None:
            self.summary["images"].remove(self._current)
            if self._current["outputs"]:
                failure["outputs"] = self._current["outputs"]
            self._current = None
        self.summary["failures"].append(failure)
        self.write()

    def interrupted(self) -> None:
        """Called on an interrupt: record it and write what is on disk."""
        self.summary["interrupted"] = True
        self.write()


@dataclass
class BatchPlan:
    """What a batch run needs besides the predictor and the per-image options."""

    out: Path  # output root
    scenes: list[Any]  # rsrefseg.inference.jobs.SceneInput, in input order
    folders: list[str]  # unique output folder name of each scene
    expressions: list[str]  # checked expressions
    names: list[str]  # their <nn>_<slug> file stems
    settings: dict[str, Any]  # everything that changes the outputs (hashed for the manifest)
    resume: bool = False  # skip scenes the manifest lists as finished
    merge: Path | None = None  # merged vector file of every scene
    merge_crs: str | None = None  # its CRS (None: the first scene's)
    progress: str = "bar"  # progress style


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, RSRefSegError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_batch(predictor: Any, plan: BatchPlan, options: Any, summary: dict[str, Any], rank: int = 0,
              world: int = 1) -> SummaryFile:
    """Process this process's scenes (see the module docstring); returns its summary file."""
    from rsrefseg.cli.progress import progress
    from rsrefseg.inference.manifest import Manifest, content_hash
    from rsrefseg.inference.predict_job import process_image

    part = plan.out / ("summary.json" if world == 1 else f"summary.rank{rank}.json")
    remove_stale_temp_files(plan.out, {part.name})
    book = SummaryFile(part, summary)
    manifest = Manifest(plan.out)
    expressions_key, settings_key = content_hash(plan.expressions), content_hash(plan.settings)
    shard = range(rank, len(plan.scenes), world)
    desc = "predict" if world == 1 else f"predict [rank {rank}]"
    try:
        for i in progress(iter(shard), plan.progress, total=len(shard), desc=desc, unit="image"):
            scene = plan.scenes[i]
            entry = manifest.lookup(scene.key, expressions_key, settings_key) if plan.resume else None
            if entry is not None and manifest.outputs_complete(entry):
                book.add_resumed({**entry.info, "input_index": i})
                continue
            record: dict[str, Any] = {"input_index": i, "scene": scene.key}
            if scene.item is not None:
                record.update(stac_item=scene.item, stac_asset=scene.asset)
            try:
                files = process_image(predictor, scene.path, plan.out / plan.folders[i], plan.expressions,
                                      plan.names, options, book, record)
                # absolute: relative paths would be taken relative to the output folder (a relative --out)
                manifest.record(scene.key, expressions_key, settings_key, [f.absolute() for f in files], info=record)
            except Exception as exc:  # one failing image never stops the batch
                predictor.reset_image()
                line = _error_line(exc)
                print(f"error: {line}", file=sys.stderr)
                book.fail_image({"input_index": i, "source": str(scene.path), "error": line,
                                 "error_type": type(exc).__name__})
                with contextlib.suppress(OSError):
                    (plan.out / plan.folders[i]).rmdir()  # only when the failed scene left it empty
    except KeyboardInterrupt:
        book.interrupted()
        raise
    book.write()
    return book


def merge_scene_vectors(summary: dict[str, Any], out: Path, merge: Path, merge_crs: str | None) -> dict[str, Any]:
    """Merge the vector files of every image of ``summary`` into ``merge``; returns its summary entry."""
    from rsrefseg.inference.vectors import merge_vectors

    inputs = [out / image["vector"] for image in summary["images"] if image.get("vector")]
    if not inputs:
        raise DataError(f"{merge}: no georeferenced image, nothing to merge")
    count = merge_vectors(inputs, merge, crs=merge_crs)
    return {"path": str(merge), "features": count, "inputs": len(inputs), "crs": merge_crs or "first scene"}
