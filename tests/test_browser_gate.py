"""The browser test must fail, not skip, in CI (``CI=true``) when Chromium is missing (outside CI it skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a pytest subprocess (imports torch through conftest)
def test_browser_test_fails_in_ci_without_chromium(tmp_path: Path) -> None:
    env = dict(os.environ, CI="true", RSREFSEG_CHROMIUM=str(tmp_path / "no-chromium"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rs",
         "tests/browser/test_web_demo.py", "-k", "too_heavy"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Chromium not found at" in output and "CI=true, so the browser test fails instead of skipping" in output
    assert "1 error" in output and "skipped" not in output, output[-3000:]
