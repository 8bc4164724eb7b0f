"""End-to-end test of ``rsrefseg serve`` in a real headless Chromium (Debian's, driven by Playwright).

The server runs as a subprocess (``python -m rsrefseg serve``) on a free port of 127.0.0.1 with a
tiny random checkpoint. Every request the page makes outside 127.0.0.1 is blocked and recorded; the
test fails if there was any (the demo must work offline). Screenshots go to ``$RSREFSEG_ARTIFACTS``
(default: a pytest temporary folder) and their paths are printed.

Outside CI a missing Chromium or Playwright skips these tests (with the reason); in CI
(``CI=true``, as ``.ci/run`` sets it) they fail instead, so the browser check cannot vanish silently.
"""

from __future__ import annotations

import os
import re
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.serve_helpers import start_server

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
UI_TIMEOUT_MS = 45_000
SESSION_END_TIMEOUT_S = 60.0


def in_ci() -> bool:
    """Whether this runs in CI (``CI`` set to anything but empty/0/false, as CI services do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str) -> None:
    """Skip for ``reason``, or fail in CI (where a missing browser must not pass unnoticed)."""
    if in_ci():
        pytest.fail(f"{reason}; CI=true, so the browser test fails instead of skipping", pytrace=False)
    pytest.skip(reason)


def _requirements() -> None:
    """Skip (or, in CI, fail) with the reason when the browser, Playwright or Gradio is missing."""
    if not Path(CHROMIUM).is_file():
        _missing(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set RSREFSEG_CHROMIUM)")
    for module, hint in (("playwright.sync_api", "pip install playwright"), ("gradio", "pip install 'rsrefseg[app]'")):
        try:
            __import__(module)
        except ModuleNotFoundError:
            _missing(f"{module.split('.')[0]} is not installed ({hint})")


def _sample(root: Path) -> Path:
    """The 800 x 800 DIOR sample of the shared data, or a synthetic stand-in of the same name and size."""
    from PIL import Image

    from rsrefseg.paths import formats_root

    image = formats_root() / "dior_00001.jpg"
    if image.is_file():
        return image
    stand_in = root / "dior_00001.jpg"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, size=(800, 800, 3), dtype=np.uint8)).save(stand_in, quality=85)
    return stand_in


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and downloads are kept (``$RSREFSEG_ARTIFACTS`` or a temporary folder)."""
    env = os.environ.get("RSREFSEG_ARTIFACTS")
    folder = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``rsrefseg serve`` on a free port with a tiny checkpoint; yields ``url``, ``image``, ``big``, ..."""
    _requirements()
    from PIL import Image

    root = tmp_path_factory.mktemp("web-demo")
    image = _sample(root)
    big = root / "too_big.png"  # 1200 x 1000 = 1.2 MP > MAX_PIXELS, a small file
    ramp = np.broadcast_to(np.arange(1200, dtype=np.uint16)[None, :, None] // 5, (1000, 1200, 3))
    Image.fromarray(ramp.astype(np.uint8)).save(big)
    heavy = root / "too_heavy.png"  # 700 x 700 noise: about 1.4 MB > MAX_UPLOAD_MB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(700, 700, 3), dtype=np.uint8)).save(heavy)
    tmp = root / "tmp"
    tmp.mkdir()
    # A heartbeat every second (Gradio's default: 15 s), so a closed tab is noticed at once.
    running = start_server(root, "--max-pixels", str(MAX_PIXELS), "--max-upload-mb", str(MAX_UPLOAD_MB),
                           env={"TMPDIR": str(tmp), "GRADIO_HEARTBEAT_INTERVAL": "1"})
    folder = running.folder
    try:
        yield {"url": running.url, "image": image, "big": big, "heavy": heavy, "log": running.log,
               "folder": folder, "server": running}
    finally:
        status = running.stop(signal.SIGINT)  # Ctrl+C: a clean stop that deletes every upload and result
    assert status == 0 and not folder.exists(), running.text()[-2000:]
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []


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


def _toast(page: Any, index: int = 0) -> str:
    """The text of the ``index``-th error toast, once it is shown."""
    page.wait_for_function(f"document.querySelectorAll('[data-testid=\"toast-text\"]').length > {index}")
    return page.locator('[data-testid="toast-text"]').nth(index).inner_text().strip()


def test_over_long_expression_shows_clear_message(page: Any, server: dict[str, Any], artifacts: Path) -> None:
    """An expression above 1000 characters is refused with one line saying so; nothing is segmented."""
    _upload(page, server["image"])
    page.locator("#rsrefseg-preview img").first.wait_for()
    words = "the large white building next to the curved road on the left side of the old harbour "
    page.locator("#rsrefseg-expressions textarea").fill("the ship\n" + (words * 30)[:1500])
    page.locator("#rsrefseg-run").click()
    text = _toast(page)
    assert text == ("expression 2 has 1500 characters; at most 1000 are accepted "
                    "(the text encoder reads only the first 64-77 tokens)"), text
    page.wait_for_timeout(600)  # let the toast finish fading in
    shot = artifacts / "web_demo_long_expression.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    assert page.locator("#rsrefseg-overlays img").count() == 0


def test_pasted_megabytes_are_cut_by_the_box_and_refused(page: Any, server: dict[str, Any]) -> None:
    """The expressions box holds one character more than the server accepts (16 x 1001): a 10 MB
    paste is cut there by the browser and refused by the server with its message."""
    box = page.locator("#rsrefseg-expressions textarea")
    limit = 16 * 1001
    assert box.get_attribute("maxlength") == str(limit + 1)
    _upload(page, server["image"])
    page.locator("#rsrefseg-preview img").first.wait_for()
    box.focus()
    start = time.monotonic()
    page.keyboard.insert_text("the ship in the harbour\n" * (10 * 2**20 // 24))  # as a paste would
    assert len(box.input_value()) == limit + 1
    page.locator("#rsrefseg-run").click()
    text = _toast(page)
    print(f"\n10 MB paste cut and refused in {time.monotonic() - start:.1f} s")
    assert text.startswith(f"the expressions are {limit + 1} characters long; at most {limit} are accepted"), text
    assert page.locator("#rsrefseg-overlays img").count() == 0


def test_closing_the_tab_deletes_its_files(browser: Any, server: dict[str, Any]) -> None:
    """A session's upload, preview and results are deleted when its tab closes (Gradio's unload)."""
    folder: Path = server["folder"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.route("**/*", lambda route: route.continue_() if "127.0.0.1" in route.request.url else route.abort())
    tab = context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)
    tab.goto(server["url"])
    _upload(tab, server["image"])
    tab.locator("#rsrefseg-expressions textarea").fill("the ship")
    tab.locator("#rsrefseg-run").click()
    tab.locator("#rsrefseg-overlays img").first.wait_for()
    # Everything but the lock and Gradio's own empty leftovers (swept separately, after a minute).
    mine = [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"
            and not (p.parent == folder and p.name.startswith("tmp") and p.stat().st_size == 0)]
    assert any(p.name == server["image"].name for p in mine) and any(p.name.endswith(".overlay.png") for p in mine)
    context.close()
    deadline = time.monotonic() + SESSION_END_TIMEOUT_S
    while any(p.exists() for p in mine):
        assert time.monotonic() < deadline, [p for p in mine if p.exists()]
        time.sleep(0.5)
    assert server["server"].alive()
