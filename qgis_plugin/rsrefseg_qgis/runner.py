"""Run the ``rsrefseg`` command of another Python environment as a subprocess.

QGIS's Python does not have (and must not get) torch & co, so the plugin never imports
``rsrefseg``: it starts the command, follows its ``--progress json`` lines on stderr, polls the
Processing feedback for cancellation (then terminates the process), and collects the one-line
``error: ...`` messages of the CLI. This module imports nothing from QGIS, so it is tested with a
fake feedback object too.

A *feedback* is anything with the methods of ``QgsProcessingFeedback`` used here: ``isCanceled()``,
``setProgress(percent)``, ``setProgressText(text)``, ``pushInfo(text)``, ``pushConsoleInfo(text)``,
``reportError(text, fatalError)``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Environment variables of QGIS's own Python that would break another interpreter.
_FOREIGN_PYTHON_VARS = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "VIRTUAL_ENV")
#: Variable whose value becomes the child's ``PYTHONPATH`` (development checkouts, the tests).
CHILD_PYTHONPATH_VAR = "RSREFSEG_PYTHONPATH"
#: An error line of the CLI: ``error: ...`` (project convention) or argparse's ``rsrefseg predict: error: ...``.
_ERROR_LINE = re.compile(r"^(?:rsrefseg(?: [\w-]+)?: )?error: ")
#: Seconds a terminated process gets to exit before it is killed.
TERMINATE_GRACE_S = 5.0


class RSRefSegNotFound(Exception):
    """No usable ``rsrefseg`` command (setting empty and not on PATH, or a wrong path)."""


class CliFailed(Exception):
    """The command exited with a non-zero status; ``str()`` is its error line(s)."""

    def __init__(self, message: str, returncode: int, errors: list[str]) -> None:
        super().__init__(message)
        self.returncode, self.errors = returncode, errors


class Cancelled(Exception):
    """The user cancelled; the process was terminated."""


@dataclass
class CliResult:
    """What a finished command left: exit status, error lines, stdout lines, JSON events."""

    returncode: int  # exit status (0 success, 1 some inputs failed, 2 user error)
    errors: list[str] = field(default_factory=list)  # the ``error: ...`` lines of stderr, in order
    stdout: list[str] = field(default_factory=list)  # stdout lines
    stderr_tail: list[str] = field(default_factory=list)  # last plain (non-JSON) stderr lines
    events: list[dict[str, Any]] = field(default_factory=list)  # JSON events other than "progress"


def resolve_command(setting: str | None) -> list[str]:
    """The argv prefix that runs rsrefseg, from the plugin's environment setting.

    ``setting`` may be empty (then ``rsrefseg`` on PATH), an environment folder (its
    ``bin/rsrefseg``, ``Scripts/rsrefseg.exe`` or, failing those, its Python with ``-m rsrefseg``),
    the ``rsrefseg`` executable itself, or a Python executable (run as ``python -m rsrefseg``).

    Raises:
        RSRefSegNotFound: nothing usable at that place.
    """
    text = (setting or "").strip().strip('"')
    if not text:
        found = shutil.which("rsrefseg")
        if found is None:
            raise RSRefSegNotFound(
                "rsrefseg was not found on PATH; set the path of the Python environment where rsrefseg is "
                "installed in Raster > RSRefSeg > Settings")
        return [found]
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        for candidate in (path / "bin" / "rsrefseg", path / "Scripts" / "rsrefseg.exe", path / "rsrefseg",
                          path / "rsrefseg.exe"):
            if candidate.is_file():
                return [str(candidate)]
        for python in (path / "bin" / "python", path / "python.exe", path / "Scripts" / "python.exe"):
            if python.is_file():
                return [str(python), "-m", "rsrefseg"]
        raise RSRefSegNotFound(f"{path}: no rsrefseg command or Python found in this environment folder")
    if path.is_file():
        if path.name.lower().startswith("python"):
            return [str(path), "-m", "rsrefseg"]
        return [str(path)]
    raise RSRefSegNotFound(f"{path}: no such file or folder (RSRefSeg environment setting)")


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the subprocess: QGIS's Python variables removed, unbuffered UTF-8 output.

    ``RSREFSEG_PYTHONPATH``, when set, becomes the child's ``PYTHONPATH`` (a development checkout).
    """
    env = dict(os.environ if base is None else base)
    for name in _FOREIGN_PYTHON_VARS:
        env.pop(name, None)
    if env.get(CHILD_PYTHONPATH_VAR):
        env["PYTHONPATH"] = env[CHILD_PYTHONPATH_VAR]
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class ProgressTracker:
    """Overall progress from nested stages (``predict`` > ``tiles``, ``encode`` > ``windows``).

    Stages are ordered by first appearance, the first one outermost. An update of a stage forgets
    the state of the stages inside it (they restart for the next item).
    """

    def __init__(self) -> None:
        self.order: list[str] = []
        self.state: dict[str, tuple[float, float]] = {}

    def update(self, event: dict[str, Any]) -> float | None:
        """Record one ``progress`` event; return the overall fraction in [0, 1] (None if unknown)."""
        stage = str(event.get("stage", ""))
        done, total = event.get("done"), event.get("total")
        if stage not in self.order:
            self.order.append(stage)
        for inner in self.order[self.order.index(stage) + 1:]:
            self.state.pop(inner, None)
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            self.state[stage] = (float(done), float(total))
        fraction = None
        for name in reversed(self.order):
            if name not in self.state:
                continue
            done_k, total_k = self.state[name]
            inner = fraction or 0.0
            fraction = 1.0 if done_k >= total_k else min(1.0, (done_k + inner) / total_k)
        return fraction


def _reader(stream: Any, tag: str, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put((tag, line.rstrip("\r\n")))
    stream.close()
    lines.put((tag, None))


def _call(feedback: Any, method: str, *args: Any) -> None:
    func = getattr(feedback, method, None)
    if func is not None:
        func(*args)


def format_command(argv: list[str]) -> str:
    """A shell-like rendering of ``argv`` for the log."""
    return " ".join(shlex.quote(a) for a in argv)


def run_cli(argv: list[str], feedback: Any, poll_s: float = 0.1, env: dict[str, str] | None = None) -> CliResult:
    """Run ``argv`` (a full rsrefseg command line), report its progress, honour cancellation.

    Returns the :class:`CliResult` whatever the exit status (the caller decides).

    Raises:
        Cancelled: ``feedback.isCanceled()`` became true; the process was terminated (killed after
            :data:`TERMINATE_GRACE_S`) before this returns.
        RSRefSegNotFound: the executable cannot be started.
    """
    _call(feedback, "pushCommandInfo", format_command(argv))
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    try:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            encoding="utf-8", errors="replace", env=env if env is not None else child_env(),
            creationflags=flags,
        )
    except OSError as exc:
        raise RSRefSegNotFound(f"{argv[0]}: cannot start rsrefseg ({exc.strerror or exc})") from None
    lines: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=_reader, args=(proc.stdout, "out", lines), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, "err", lines), daemon=True)]
    for thread in threads:
        thread.start()
    result = CliResult(returncode=-1)
    tracker = ProgressTracker()
    open_streams = 2
    try:
        while open_streams:
            if feedback.isCanceled():
                raise Cancelled("cancelled by the user")
            try:
                tag, line = lines.get(timeout=poll_s)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
            elif tag == "out":
                result.stdout.append(line)
                _call(feedback, "pushConsoleInfo", line)
            else:
                _handle_stderr(line, result, tracker, feedback)
        while proc.poll() is None:  # streams closed: the process is exiting
            if feedback.isCanceled():
                raise Cancelled("cancelled by the user")
            time.sleep(poll_s / 2)
    except BaseException:
        _stop(proc)
        raise
    finally:
        for thread in threads:
            thread.join(timeout=1.0)
    result.returncode = proc.returncode
    return result


def _handle_stderr(line: str, result: CliResult, tracker: ProgressTracker, feedback: Any) -> None:
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            if event.get("event") == "progress":
                fraction = tracker.update(event)
                if fraction is not None:
                    feedback.setProgress(100.0 * fraction)
                text = f"{event.get('stage', '')}: {event.get('done')}/{event.get('total')}"
                if event.get("message"):
                    text += f" {event['message']}"
                _call(feedback, "setProgressText", text)
            else:
                result.events.append(event)
            return
    if not line.strip():
        return
    if _ERROR_LINE.match(line):
        result.errors.append(line)
        feedback.reportError(line, False)
    else:
        result.stderr_tail = ([*result.stderr_tail, line])[-20:]
        _call(feedback, "pushConsoleInfo", line)


def _stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc``, kill it if it does not exit in time, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check(result: CliResult, what: str = "rsrefseg") -> None:
    """Raise :class:`CliFailed` when ``result`` is a failure, with the CLI's error lines as message.

    Without an ``error:`` line (a crash) the message is the last stderr lines.
    """
    if result.returncode == 0:
        return
    if result.errors:
        message = "\n".join(result.errors)
    else:
        tail = "\n".join(result.stderr_tail[-5:])
        message = f"{what} exited with status {result.returncode}" + (f":\n{tail}" if tail else "")
    raise CliFailed(message, result.returncode, result.errors)


_HELP_CACHE: dict[tuple[str, ...], str] = {}


def command_help(command: list[str], subcommand: str, timeout_s: float = 120.0) -> str:
    """``rsrefseg <subcommand> --help`` (cached per command), to find which options it has.

    Raises:
        RSRefSegNotFound: the command cannot run or has no such sub-command.
    """
    key = (*command, subcommand)
    if key not in _HELP_CACHE:
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        try:
            done = subprocess.run([*command, subcommand, "--help"], capture_output=True, text=True,
                                  encoding="utf-8", errors="replace", env=child_env(), timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, creationflags=flags)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RSRefSegNotFound(f"{command[0]}: cannot run rsrefseg ({exc})") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RSRefSegNotFound(f"{format_command(command)} {subcommand}: not available ({last})")
        _HELP_CACHE[key] = done.stdout
    return _HELP_CACHE[key]
