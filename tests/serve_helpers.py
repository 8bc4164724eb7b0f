"""Start and stop ``rsrefseg serve`` as a subprocess on 127.0.0.1 (for the HTTP, load and browser tests)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Generous: on a machine loaded by a parallel test run, importing torch + gradio alone took over 2 minutes.
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 45.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_checkpoint(folder: Path) -> Path:
    """A ``tiny`` checkpoint at seeded random init (written once per folder)."""
    from rsrefseg import RSRefSeg

    if not (folder / "config.json").is_file():
        RSRefSeg.from_preset("tiny").save_pretrained(folder)
    return folder


@dataclass
class Server:
    """A running ``rsrefseg serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def folder(self) -> Path:
        """The server's own folder for uploads and results (from its start-up line)."""
        match = re.search(r"uploads and results in (\S+) \(deleted", self.text())
        assert match, self.text()[-2000:]
        return Path(match.group(1))

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.url, timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit (killed after :data:`STOP_TIMEOUT_S`); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"rsrefseg serve did not stop within {STOP_TIMEOUT_S:.0f} s:\n{self.text()[-3000:]}")
        return int(self.proc.returncode)


def start_server(root: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """``rsrefseg serve`` with a tiny checkpoint on a free port of 127.0.0.1; waits until it answers.

    ``root``: folder for the checkpoint, the log and the working directory; ``args``: more flags.
    """
    checkpoint = tiny_checkpoint(root / "ckpt")
    port = free_port()
    full_env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    full_env.pop("GRADIO_TEMP_DIR", None)
    full_env.update(env or {})
    log = root / f"server-{port}.log"
    command = [sys.executable, "-m", "rsrefseg", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=root)
    server = Server(proc, f"http://127.0.0.1:{port}/", log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"rsrefseg serve exited with {proc.returncode}:\n{server.text()[-3000:]}")
        if "uploads and results in" in server.text() and server.alive():
            return server
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    pytest.fail(f"rsrefseg serve not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{server.text()[-3000:]}")


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmHWM``, ``VmRSS``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
