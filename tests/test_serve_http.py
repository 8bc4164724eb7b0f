"""``rsrefseg serve`` through its real HTTP API on 127.0.0.1 (gradio_client and plain HTTP).

- where uploads and results are kept (a 0700 folder of the server's own, not Gradio's shared
  ``$TMPDIR/gradio``), that a session's files go when its client disconnects, and that nothing is
  left anywhere in ``$TMPDIR`` after SIGTERM;
- the bad-input rows that matter over HTTP: a corrupt upload, a 10 MB expression text, a path or
  a URL in place of an upload; the message names the file and the problem, no traceback reaches
  the client, and the server keeps serving.

Each test starts its own server (about 10-40 s with a busy CPU): marked slow.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.serve_helpers import Server, start_server
from tests.test_demo_service import _png

pytestmark = pytest.mark.slow
gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

#: Entries torch itself may leave in $TMPDIR (its compile cache); nothing else may remain.
NOT_OURS = ("torchinductor_",)
SESSION_END_TIMEOUT_S = 60.0


def _client(server: Server, downloads: Path) -> Any:
    return gradio_client.Client(server.url, verbose=False, download_files=str(downloads))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _call(server: Server, api: str, data: list[Any]) -> tuple[str, Any]:
    """POST ``data`` to ``/gradio_api/call/<api>`` and read the result stream: ``(event, payload)``."""
    request = urllib.request.Request(f"{server.url}gradio_api/call/{api}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/{api}/{event_id}", timeout=120) as response:
        lines = response.read().decode().splitlines()
    event = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("event:"))
    payload = json.loads(next(line.split(":", 1)[1] for line in lines if line.startswith("data:")))
    return event, payload


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_serve_keeps_uploads_private_and_deletes_them(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"  # the server's $TMPDIR: Gradio's shared folder would be tmp/gradio
    tmp.mkdir()
    t0 = time.monotonic()
    # A heartbeat every second (Gradio's default: 15 s): a disconnected client is noticed at once.
    server = start_server(tmp_path, env={"TMPDIR": str(tmp), "GRADIO_HEARTBEAT_INTERVAL": "1"})
    print(f"\nserver up in {time.monotonic() - t0:.1f} s")
    try:
        folder = server.folder
        assert folder.parent == tmp.resolve() and folder.name.startswith("rsrefseg-serve-")
        assert folder.stat().st_mode & 0o777 == 0o700
        image = _png(tmp_path / "harbour.png", 60, 80)

        first = _client(server, tmp_path / "dl1")
        preview = first.predict(gradio_client.handle_file(str(image)), "", api_name="/load")
        overlays, heatmaps, _, summary = first.predict(
            gradio_client.handle_file(str(image)), "the ship\nthe pier", 0.5, "", api_name="/segment")
        assert len(overlays) == 2 and len(heatmaps) == 2 and "harbour.png" in summary and Path(preview).is_file()
        ours = _files(folder)
        names = [p.name for p in ours]
        assert "harbour.png" in names and "harbour_masks.zip" in names and "01_the-ship.overlay.png" in names
        assert not (tmp / "gradio").exists()
        assert all(p.stat().st_mode & 0o077 == 0 for p in ours), [(p, oct(p.stat().st_mode)) for p in ours]

        # Bad inputs over HTTP: one line naming the file and the problem; the server keeps serving.
        junk = tmp_path / "broken.png"
        junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        with pytest.raises(gradio_client.exceptions.AppError) as info:
            first.predict(gradio_client.handle_file(str(junk)), "the ship", 0.5, "", api_name="/segment")
        message = str(info.value)
        assert message.startswith("broken.png: cannot read image") and str(folder) not in message, message
        start = time.monotonic()
        with pytest.raises(gradio_client.exceptions.AppError) as info:  # the textbox's cap does not bind API clients
            first.predict(gradio_client.handle_file(str(image)), "x" * 10 * 2**20, 0.5, "", api_name="/segment")
        assert str(info.value).startswith("the expressions are 10485760 characters long; at most 16016 are accepted")
        print(f"\n10 MB expression text refused in {time.monotonic() - start:.1f} s (upload of the text included)")
        for path, expected in ((str(image), None), ("/etc/passwd", None),
                               ("https://example.com/a.png", "upload the image file; URLs are not fetched")):
            event, payload = _call(server, "segment", [{"path": path, "meta": {"_type": "gradio.FileData"}},
                                                       "the ship", 0.5, ""])
            assert event == "error" and payload.get("error") == expected, (path, payload)  # no path, no traceback
        assert "Traceback" not in json.dumps(payload)
        assert len(first.predict(gradio_client.handle_file(str(image)), "the road", 0.5, "",
                                 api_name="/segment")[0]) == 1

        # A client that disconnects ends its session: its results and its upload are deleted.
        second = _client(server, tmp_path / "dl2")
        other = _png(tmp_path / "other.png", 50, 50, seed=7)
        second.predict(gradio_client.handle_file(str(other)), "the ship", 0.5, "", api_name="/segment")
        assert any(p.name == "other.png" for p in _files(folder))
        first.close()
        t0 = time.monotonic()
        _wait_for(lambda: not any(p.name in ("harbour.png", "harbour_masks.zip") for p in _files(folder)),
                  SESSION_END_TIMEOUT_S, "the first session's files to be deleted")
        print(f"session files deleted {time.monotonic() - t0:.1f} s after the client closed")
        assert any(p.name == "other.png" for p in _files(folder))  # the other session is untouched
        assert server.alive()
    finally:
        t0 = time.monotonic()
        status = server.stop(signal.SIGTERM)  # `second` is still connected
        print(f"stopped in {time.monotonic() - t0:.1f} s")
    assert status == 0, server.text()[-2000:]
    assert not folder.exists()
    left = [p.name for p in tmp.iterdir() if not p.name.startswith(NOT_OURS)]
    assert left == [], left
    assert "Traceback" not in server.text().split("stopping")[-1]  # a clean shutdown
