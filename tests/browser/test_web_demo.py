"""End-to-end test of ``rsrefseg serve`` in a real headless Chromium (Debian's, driven by Playwright).

The server runs as a subprocess (``python -m rsrefseg serve``) on a free port of 127.0.0.1 with a
tiny random checkpoint. Every request the page makes outside 127.0.0.1 is blocked and recorded; the
test fails if there was any (the demo must work offline). Screenshots go to ``$RSREFSEG_ARTIFACTS``
(default: a pytest temporary folder) and their paths are printed.
"""

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
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("RSREFSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
#: ``--max-pixels`` of the served app: the 800 x 800 sample passes, the 1200 x 1000 image does not.
MAX_PIXELS = 1_000_000
#: ``--max-upload-mb`` of the served app (the sample is 0.2 MB).
MAX_UPLOAD_MB = 1
STARTUP_TIMEOUT_S = 90.0
UI_TIMEOUT_MS = 45_000


def _requirements() -> Path:
    """The sample image; skips (with the reason) when the browser, Playwright, Gradio or the image is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'rsrefseg[app]')")
    from rsrefseg.paths import formats_root

    image = formats_root() / "dior_00001.jpg"
    if not image.is_file():
        pytest.skip(f"sample image not found at {image} (set RSREFSEG_DATA)")
    return image


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"rsrefseg serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"rsrefseg serve not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and downloads are kept (``$RSREFSEG_ARTIFACTS`` or a temporary folder)."""
    env = os.environ.get("RSREFSEG_ARTIFACTS")
    folder = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``rsrefseg serve`` on a free port with a tiny checkpoint; yields ``url``, ``image``, ``big``."""
    image = _requirements()
    from PIL import Image

    from rsrefseg import RSRefSeg

    root = tmp_path_factory.mktemp("web-demo")
    checkpoint = root / "ckpt"
    RSRefSeg.from_preset("tiny").save_pretrained(checkpoint)
    big = root / "too_big.png"  # 1200 x 1000 = 1.2 MP > MAX_PIXELS, a small file
    ramp = np.broadcast_to(np.arange(1200, dtype=np.uint16)[None, :, None] // 5, (1000, 1200, 3))
    Image.fromarray(ramp.astype(np.uint8)).save(big)
    heavy = root / "too_heavy.png"  # 700 x 700 noise: about 1.4 MB > MAX_UPLOAD_MB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(700, 700, 3), dtype=np.uint8)).save(heavy)

    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = root / "server.log"
    command = [sys.executable, "-m", "rsrefseg", "serve", "--checkpoint", str(checkpoint),
               "--host", "127.0.0.1", "--port", str(port), "--max-pixels", str(MAX_PIXELS),
               "--max-upload-mb", str(MAX_UPLOAD_MB), "--device", "cpu"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_ready(url, proc, log)
        yield {"url": url, "image": image, "big": big, "heavy": heavy, "log": log}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium (no Playwright browser download)."""
    _requirements()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: Any, server: dict[str, Any]) -> Iterator[Any]:
    """A fresh page on the demo; requests leaving 127.0.0.1 are blocked and must not happen."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    external: list[str] = []

    def guard(route: Any) -> None:
        host = re.sub(r"^[a-z]+://([^/:]+).*$", r"\1", route.request.url)
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    tab = context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)
    tab.goto(server["url"])
    tab.locator("#rsrefseg-run").wait_for()
    yield tab
    context.close()
    assert not external, f"the page tried to reach the internet: {external}"


def _upload(page: Any, path: Path) -> None:
    page.locator("#rsrefseg-upload input[type=file]").set_input_files(str(path))


def test_segment_in_browser(page: Any, server: dict[str, Any], artifacts: Path) -> None:
    """Upload the sample, type two expressions, run: overlays, heatmaps and downloads appear."""
    start = time.monotonic()
    _upload(page, server["image"])
    page.locator("#rsrefseg-preview img").first.wait_for()  # encoded and previewed on upload
    page.locator("#rsrefseg-expressions textarea").fill("the ship in the harbour\nthe white storage tank")
    page.locator("#rsrefseg-run").click()

    overlays = page.locator("#rsrefseg-overlays img")
    overlays.first.wait_for()
    page.wait_for_function("document.querySelectorAll('#rsrefseg-overlays img').length >= 2")
    zip_link = page.locator('#rsrefseg-downloads a[download="dior_00001_masks.zip"]')
    zip_link.wait_for()
    page.locator("#rsrefseg-summary").get_by_text("800 x 800 px").wait_for()
    assert "the ship in the harbour" in page.locator("#rsrefseg-overlays").inner_text()
    assert page.locator("#rsrefseg-heatmaps img").count() >= 1
    downloads = page.locator("#rsrefseg-downloads a[download]")
    names = [downloads.nth(i).get_attribute("download") for i in range(downloads.count())]
    assert "01_the-ship-in-the-harbour.mask.png" in names, names

    shot = artifacts / "web_demo.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")

    with page.expect_download() as info:
        zip_link.click()
    zip_path = artifacts / "web_demo_masks.zip"
    info.value.save_as(str(zip_path))
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert "dior_00001/01_the-ship-in-the-harbour.mask.png" in names, names
    assert "dior_00001/02_the-white-storage-tank.overlay.png" in names, names
    print(f"browser flow took {time.monotonic() - start:.1f} s")


def test_too_large_image_shows_clear_message(page: Any, server: dict[str, Any], artifacts: Path) -> None:
    """An image above ``--max-pixels`` is refused with one line naming the file and the limit."""
    _upload(page, server["big"])
    toast = page.locator('[data-testid="toast-text"]')
    toast.first.wait_for()
    text = toast.first.inner_text().strip()
    assert re.fullmatch(r"too_big\.png: image is 1200 x 1000 = 1\.2 MP, above the limit of 1 MP \(1000000 pixels\)", text), text
    page.wait_for_timeout(600)  # let the toast finish fading in
    shot = artifacts / "web_demo_limit.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    # Running anyway gives the same one-line message, and no result.
    page.locator("#rsrefseg-expressions textarea").fill("the ship")
    page.locator("#rsrefseg-run").click()
    page.wait_for_function("document.querySelectorAll('[data-testid=\"toast-text\"]').length >= 2")
    assert toast.nth(1).inner_text().strip() == text
    assert page.locator("#rsrefseg-overlays img").count() == 0


def test_too_heavy_file_is_refused_before_upload(page: Any, server: dict[str, Any]) -> None:
    """A file above ``--max-upload-mb`` is refused in the browser, naming the file and the limit."""
    _upload(page, server["heavy"])
    toast = page.locator('[data-testid="toast-text"]')
    toast.first.wait_for()
    text = toast.first.inner_text().strip()
    assert "too_heavy.png" in text and "1.0 Mb" in text and "\n" not in text, text
