"""Run the rows of tests/test_bad_inputs.py in ONE process (imports paid once) and report each.

Usage: ``python bad_inputs_driver.py ROWS.json SANDBOX RESULTS.json``. A row is
``{"id", "cli": [argv...]}`` (run through ``rsrefseg.cli.main.main``, as the ``rsrefseg`` command)
or ``{"id", "api": name, "args": [...]}`` (a Python API call). For every row it records the exit
status (2 for an :class:`RSRefSegError`, ``"traceback"`` for any other exception), stderr, the
peak resident memory during the row (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
its wall time and what changed under SANDBOX (files created, removed or modified).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _vm(field: str) -> int:
    """``VmHWM`` / ``VmRSS`` of this process in kB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns) if path.is_file() else (-1, 0)
    return found


class _Api:
    """The Python API entry points of the table (the predictor is built on first use)."""

    def __init__(self, checkpoint: str, image: str) -> None:
        self.checkpoint, self.image = checkpoint, image
        self._predictor: Any = None

    def predictor(self) -> Any:
        if self._predictor is None:
            from rsrefseg.inference.predictor import Predictor

            self._predictor = Predictor.from_pretrained(self.checkpoint, device="cpu")
        return self._predictor

    def call(self, name: str, args: list[Any]) -> Any:
        if name == "read_image":
            from rsrefseg.data.imageio import read_image

            return read_image(*args)
        if name == "from_pretrained":
            from rsrefseg import RSRefSeg

            return RSRefSeg.from_pretrained(*args)
        if name == "predictor_from_pretrained":
            from rsrefseg.inference.predictor import Predictor

            return Predictor.from_pretrained(*args, device="cpu")
        if name == "set_image":
            return self.predictor().set_image(*args)
        if name == "predict":
            predictor = self.predictor()
            predictor.set_image(self.image)
            return predictor.predict(args)
        raise ValueError(f"unknown API call {name}")


def run_row(row: dict[str, Any], api: _Api) -> dict[str, Any]:
    from rsrefseg.cli.main import main
    from rsrefseg.errors import RSRefSegError

    out, err = io.StringIO(), io.StringIO()
    code: int | str
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if "cli" in row:
                code = main(row["cli"])
            else:
                api.call(row["api"], row.get("args", []))
                code = 0
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except RSRefSegError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        except BaseException:  # what the rsrefseg command would print as a traceback
            traceback.print_exc()
            code = "traceback"
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    rows = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    sandbox, results_path = Path(sys.argv[2]), Path(sys.argv[3])
    import rsrefseg.cli.main  # noqa: F401 - imports paid before the first row is measured

    api = _Api(rows["checkpoint"], rows["image"])
    results = {}
    for row in rows["rows"]:
        before = _snapshot(sandbox)
        resettable = _reset_peak()
        start = time.perf_counter()
        result = run_row(row, api)
        result["seconds"] = round(time.perf_counter() - start, 3)
        result["peak_kb"] = _vm("VmHWM") if resettable else 0
        after = _snapshot(sandbox)
        result["changed"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        results[row["id"]] = result
    results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
