"""Archive jobs: a 20-scene ``rsrefseg predict`` killed with SIGKILL, rerun with ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsrefseg.inference.manifest import Manifest

SCENES = 20
TEXTS = ["the field", "a road", "the roofs"]


def _command(inputs: list[Path], checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rsrefseg", "predict", *map(str, inputs), *[a for t in TEXTS for a in ("--text", t)],
            "--checkpoint", str(checkpoint), "--out", str(out), "--vector-format", "gpkg", "--quiet", *extra]


def _manifest_lines(out: Path) -> int:
    try:
        return (out / "manifest.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _files(out: Path) -> dict[str, int]:
    """Every file under ``out`` except the run's bookkeeping -> its mtime (ns)."""
    skip = {"summary.json", "manifest.jsonl", "manifest.lock"}
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in skip}


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 12])  # finished scenes in the manifest when the job is killed
def test_sigkilled_job_resumes_every_scene_exactly_once(make_geotiff, tiny_checkpoint, tmp_path, kill_after):
    inputs = [make_geotiff(tmp_path / f"scene{i:02d}.tif", height=40, width=56, nodata_cols=4, seed=i)
              for i in range(SCENES)]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(_command(inputs, tiny_checkpoint, out), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _manifest_lines(out) < kill_after and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)  # no clean-up of any kind
    job.wait(timeout=60)
    killed_at = _manifest_lines(out)
    assert kill_after <= killed_at < SCENES, "the job ended before it could be killed"
    before = _files(out)
    finished = Manifest(out).entries()
    done = {entry.scene for entry in finished}
    assert len(done) == killed_at

    resumed = subprocess.run(_command(inputs, tiny_checkpoint, out, "--resume"), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    after = _files(out)
    summary = json.loads((out / "summary.json").read_text())
    assert [i["input_index"] for i in summary["images"]] == list(range(SCENES)) and not summary["failures"]
    assert sum(bool(i.get("resumed")) for i in summary["images"]) == killed_at
    assert all(i["complete"] for i in summary["images"])
    entries = Manifest(out).entries()
    assert sorted(e.scene for e in entries) == sorted(str(p.resolve()) for p in inputs)  # each scene once
    assert _manifest_lines(out) == SCENES  # the finished scenes were not recorded again
    for entry in entries:
        assert Manifest(out).outputs_complete(entry)
        listed = {path for path, _size in entry.outputs}
        folder = Path(next(iter(listed))).parts[0]
        on_disk = {k for k in after if k.startswith(folder + "/")}
        assert listed == on_disk  # nothing partial, nothing extra (temporaries of the kill removed)
        assert len(listed) == 3 * 4 + 1  # 3 expressions x (mask png, overlay, COG, GeoJSON) + the GeoPackage
        if entry.scene in done:  # written once: the resumed run did not touch them
            assert all(after[path] == before[path] for path in listed)
    assert not [k for k in after if ".tmp" in k]


@pytest.mark.slow
def test_resume_skips_only_identical_work(make_geotiff, tiny_checkpoint, tmp_path):
    inputs = [make_geotiff(tmp_path / f"s{i}.tif", height=32, width=40, nodata_cols=0, seed=i) for i in range(2)]
    out = tmp_path / "out"
    first = subprocess.run(_command(inputs, tiny_checkpoint, out), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    stamp = _files(out)
    (out / "s1" / "01_the-field.mask.png").write_bytes(b"damaged")  # a changed output is redone
    again = subprocess.run(_command(inputs, tiny_checkpoint, out, "--resume"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [bool(i.get("resumed")) for i in summary["images"]] == [True, False]
    after = _files(out)
    assert all(after[k] == stamp[k] for k in stamp if k.startswith("s0/"))
    other = subprocess.run(_command(inputs, tiny_checkpoint, out, "--resume", "--threshold=0.5"),
                           capture_output=True, text=True, timeout=300)  # other settings: everything redone
    assert other.returncode == 0, other.stderr
    assert not any(i.get("resumed") for i in json.loads((out / "summary.json").read_text())["images"])


@pytest.mark.slow
@pytest.mark.parametrize("tiled", [False, True])
def test_interrupted_run_lists_every_file_on_disk(make_geotiff, tiny_checkpoint, tmp_path, tiled):
    """SIGINT (and SIGTERM, handled the same) in the middle of an image: exit 130, no temporary
    file, and summary.json lists exactly the prediction files on disk."""
    image = make_geotiff(tmp_path / "scene.tif", height=96, width=128, nodata_cols=8)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"the building number {i}\n" for i in range(60)))
    out = tmp_path / "out"
    tiling = ["--tile-threshold", "1", "--tile", "64", "--overlap", "16", "--batch-size", "4"] if tiled else []
    cmd = [sys.executable, "-m", "rsrefseg", "predict", str(image), "--texts-file", str(texts), "--checkpoint",
           str(tiny_checkpoint), "--out", str(out), "--quiet", "--batch-size", "2", *tiling]
    # The job gets SIGINT's default disposition, as in a terminal, whatever this test process
    # inherited (an ignored SIGINT is inherited across exec: a runner started in the background by
    # a shell without job control ignores it, and the job would then finish instead of stopping).
    job = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while len(list(out.glob("scene/*.overlay.png"))) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130 and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["images"][0]["complete"] is False
    listed = {path for record in summary["images"][0]["outputs"] for key, path in record.items()
              if key in ("mask_png", "overlay_png", "mask_tif", "geojson")}
    on_disk = {str(p.relative_to(out)) for p in (out / "scene").iterdir()}
    assert listed == on_disk and 2 <= len(summary["images"][0]["outputs"]) < 60
