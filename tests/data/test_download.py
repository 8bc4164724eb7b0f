"""``rsrefseg data download nwpu-vhr10`` against a loopback HTTP server (nothing leaves 127.0.0.1).

Success, skip on a second run, checksum mismatch (clear error, nothing extracted), an interrupted
download (clear error, resumed with ``Range`` by the next run), unsafe archives (path traversal,
symbolic links, oversized members), wrong annotations and HTTP errors.
"""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
from loopback import serve, small_split, synthetic_coco, write_fixture

from rsrefseg.cli.main import main
from rsrefseg.data import nwpu_vhr10
from rsrefseg.data.download import DownloadError
from rsrefseg.data.nwpu_vhr10 import download_nwpu, is_complete

ZIP, ANN = "NWPU VHR-10 dataset.zip", "annotations.json"


@pytest.fixture()
def fixture(tmp_path: Path) -> dict[str, Any]:
    split = small_split()
    coco = synthetic_coco(split)
    md5s = write_fixture(tmp_path / "server", coco)
    return {"split": split, "coco": coco, "root": tmp_path / "server", **md5s}


def _leftovers(parent: Path, out: Path) -> list[str]:
    """Anything next to ``out`` besides ``out`` itself and the downloads folder."""
    return sorted(p.name for p in parent.iterdir() if p.name not in (out.name, f".{out.name}.downloads"))


def test_download_lays_out_the_split_and_a_second_run_skips(fixture: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "data" / "nwpu"
    (tmp_path / "data" / ".nwpu.tmp-stale" / "images").mkdir(parents=True)  # as a killed run leaves it
    with serve(fixture["root"]) as (url, state):
        result = download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                               annotations_md5=fixture["annotations_md5"], split=fixture["split"])
        assert not result.skipped and result.images == 6
        assert sorted(name for name, _ in state.requests) == [ZIP, ANN]
        again = download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                              annotations_md5=fixture["annotations_md5"], split=fixture["split"])
        assert again.skipped and len(state.requests) == 2  # nothing fetched again
    split = fixture["split"]["splits"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{k:03d}.jpg" for k in range(1, 7)]
    categories = fixture["coco"]["categories"]
    for name, spec in split.items():
        data = json.loads((out / "annotations" / f"instances_{name}.json").read_text())
        assert [[im["file_name"], im["id"]] for im in data["images"]] == [e[:2] for e in spec["images"]]
        assert len(data["annotations"]) == spec["num_annotations"]
        ids = {im["id"] for im in data["images"]}
        assert all(a["image_id"] in ids for a in data["annotations"]) and data["categories"] == categories
        assert list(data) == ["info", "licenses", "categories", "images", "annotations"]
    train_ids = {a["id"] for a in json.loads((out / "annotations" / "instances_train.json").read_text())["annotations"]}
    val_ids = {a["id"] for a in json.loads((out / "annotations" / "instances_val.json").read_text())["annotations"]}
    assert not train_ids & val_ids and len(train_ids | val_ids) == len(fixture["coco"]["annotations"])
    assert is_complete(out) and (out / "README.md").is_file()
    assert not (out.parent / ".nwpu.downloads").exists()  # downloads deleted after success
    assert _leftovers(out.parent, out) == []


def test_checksum_mismatch_is_clear_and_extracts_nothing(fixture: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "nwpu"
    with serve(fixture["root"]) as (url, state):
        with pytest.raises(DownloadError, match=r"checksum mismatch \(MD5 [0-9a-f]{32}, expected 0{32}\)"):
            download_nwpu(out, mirror=url, images_md5="0" * 32, annotations_md5=fixture["annotations_md5"],
                          split=fixture["split"])
        assert not out.exists() and _leftovers(tmp_path, out) == ["server"]
        downloads = tmp_path / ".nwpu.downloads"
        assert sorted(p.name for p in downloads.iterdir()) == [".lock", ANN]  # the bad archive was deleted
        result = download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                               annotations_md5=fixture["annotations_md5"], split=fixture["split"])
        assert result.images == 6
        # The verified annotations were kept from the failed run; the archive was fetched again.
        assert [name for name, _ in state.requests] == [ANN, ZIP, ZIP]


def test_interrupted_download_resumes_with_range(fixture: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "nwpu"
    size = (fixture["root"] / ZIP).stat().st_size
    with serve(fixture["root"]) as (url, state):
        state.cut[ZIP] = 1000
        with pytest.raises(DownloadError, match=rf"interrupted after 1000 of {size} bytes.*run the command again"):
            download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                          annotations_md5=fixture["annotations_md5"], split=fixture["split"])
        assert not out.exists()
        part = tmp_path / ".nwpu.downloads" / f"{ZIP}.part"
        assert part.stat().st_size == 1000
        result = download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                               annotations_md5=fixture["annotations_md5"], split=fixture["split"])
        assert result.images == 6 and is_complete(out)
        assert state.requests[-1] == (ZIP, "bytes=1000-")  # resumed, not restarted


def test_server_without_ranges_restarts_the_file(fixture: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "nwpu"
    with serve(fixture["root"]) as (url, state):
        state.cut[ZIP], state.no_range = 700, True
        with pytest.raises(DownloadError, match="interrupted"):
            download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                          annotations_md5=fixture["annotations_md5"], split=fixture["split"])
        result = download_nwpu(out, mirror=url, images_md5=fixture["images_md5"],
                               annotations_md5=fixture["annotations_md5"], split=fixture["split"])
    assert result.images == 6 and is_complete(out)  # 200 to the Range request: written from the start


def _symlink_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("case", ["traversal", "symlink", "oversized", "too_much_in_all", "missing", "not_a_zip",
                                  "not_an_image"])
def test_unsafe_or_wrong_archives_are_refused(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split = small_split()
    coco = synthetic_coco(split)
    members: list[tuple[Any, bytes]] = []
    omit: frozenset[str] = frozenset()
    expected = ""
    if case == "traversal":  # zip-slip: the only copy of 003.jpg sits under ../; plus a plain ../ escape
        omit = frozenset({"003.jpg"})
        members = [("../../positive image set/003.jpg", b"x"), ("../../evil.txt", b"evil"),
                   ("/tmp/positive image set/003.jpg", b"x")]
        expected = r"1 image\(s\) of the split are not in the archive's 'positive image set' \(first: 003.jpg\)"
    elif case == "symlink":
        omit = frozenset({"002.jpg"})
        members = [(_symlink_member("NWPU VHR-10 dataset/positive image set/002.jpg"), b"/etc/passwd")]
        expected = "is a symbolic link; refused"
    elif case == "oversized":
        monkeypatch.setattr(nwpu_vhr10, "MAX_IMAGE_BYTES", 100)
        expected = r"bytes, more than 100; refused"
    elif case == "too_much_in_all":
        monkeypatch.setattr(nwpu_vhr10, "MAX_IMAGES_BYTES", 1000)
        expected = r"the chosen members hold \d+ bytes, more than 1000; refused"
    elif case == "missing":
        omit = frozenset({"005.jpg"})
        expected = r"first: 005.jpg"
    elif case == "not_an_image":
        omit = frozenset({"004.jpg"})
        members = [("NWPU VHR-10 dataset/positive image set/004.jpg", b"GIF89a not a jpeg")]
        expected = "004.jpg from the archive is not a readable image"
    md5s = write_fixture(tmp_path / "server", coco, members, omit)
    if case == "not_a_zip":
        (tmp_path / "server" / ZIP).write_bytes(b"PK\x03\x04 truncated")
        md5s["images_md5"] = hashlib.md5(b"PK\x03\x04 truncated").hexdigest()
        expected = "not a valid zip archive"
    out = tmp_path / "work" / "nwpu"
    with serve(tmp_path / "server") as (url, _):
        with pytest.raises(DownloadError, match=expected):
            download_nwpu(out, mirror=url, split=split, **md5s)
    assert not out.exists() and _leftovers(out.parent, out) == []  # nothing half-extracted
    assert not list(tmp_path.rglob("evil.txt"))


def test_annotations_that_do_not_give_the_split_are_refused(tmp_path: Path) -> None:
    split = small_split()
    coco = synthetic_coco(split)
    victim = split["splits"]["val"]["images"][0]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != victim[1]][:]
    md5s = write_fixture(tmp_path / "server", coco)
    out = tmp_path / "nwpu"
    with serve(tmp_path / "server") as (url, _), pytest.raises(
        DownloadError, match=rf"image {victim[0]} has 0 annotations, the val split expects {victim[2]}"
    ):
        download_nwpu(out, mirror=url, split=split, **md5s)
    assert not out.exists()


def test_a_download_larger_than_its_limit_is_refused(fixture: dict[str, Any], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nwpu_vhr10, "MAX_ARCHIVE_BYTES", 100)
    with serve(fixture["root"]) as (url, _), pytest.raises(
        DownloadError, match=r"dataset.zip: \d+ bytes announced, more than the 100 expected at most"
    ):
        download_nwpu(tmp_path / "nwpu", mirror=url, images_md5=fixture["images_md5"],
                      annotations_md5=fixture["annotations_md5"], split=fixture["split"])
    assert not (tmp_path / "nwpu").exists()
    assert not (tmp_path / ".nwpu.downloads" / f"{ZIP}.part").exists() or \
        (tmp_path / ".nwpu.downloads" / f"{ZIP}.part").stat().st_size == 0


def test_http_errors_and_bad_arguments(fixture: dict[str, Any], tmp_path: Path) -> None:
    with serve(tmp_path) as (url, _):  # an empty folder: 404
        with pytest.raises(DownloadError, match=r"annotations.json: HTTP 404"):
            download_nwpu(tmp_path / "a", mirror=url, split=fixture["split"])
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:9/"):
        download_nwpu(tmp_path / "b", mirror="http://127.0.0.1:9/", split=fixture["split"])
    with pytest.raises(DownloadError, match="only http:// and https://"):
        download_nwpu(tmp_path / "c", mirror="file:///etc/", split=fixture["split"])
    with pytest.raises(DownloadError, match="MD5 must be 32 hex digits"):
        download_nwpu(tmp_path / "d", mirror="http://127.0.0.1:9/", images_md5="abc", split=fixture["split"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    with pytest.raises(DownloadError, match="exists and is not a finished NWPU VHR-10 download"):
        download_nwpu(taken, mirror="http://127.0.0.1:9/", split=fixture["split"])
    with pytest.raises(DownloadError, match=r"something.*(Not a directory|File exists)"):  # a file as parent
        download_nwpu(taken / "something" / "nwpu", mirror="http://127.0.0.1:9/", split=fixture["split"])
    from rsrefseg.data.download import exclusive_lock

    with exclusive_lock(tmp_path / ".e.downloads" / ".lock"), pytest.raises(
        DownloadError, match="another download into this folder is running"
    ):
        download_nwpu(tmp_path / "e", mirror="http://127.0.0.1:9/", split=fixture["split"])


def test_cli_errors_are_one_line(fixture: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve(fixture["root"]) as (url, _):
        code = main(["data", "download", "nwpu-vhr10", "--out", str(tmp_path / "nwpu"), "--mirror", url,
                     "--images-md5", "1" * 32, "--annotations-md5", fixture["annotations_md5"], "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "checksum mismatch" in err and "nothing was extracted" in err
    assert not (tmp_path / "nwpu").exists()


def _full_coco() -> tuple[dict[str, Any], Path | None]:
    """An annotations.json for all 650 images: the reference copy's objects merged back (sorted by
    id, as the published file) when the shared data is here, else synthetic objects per the asset."""
    from rsrefseg.paths import nwpu_root

    ref = nwpu_root() / "annotations"
    if (ref / "instances_train.json").is_file() and (ref / "instances_val.json").is_file():
        parts = [json.loads((ref / f"instances_{s}.json").read_text(encoding="utf-8")) for s in ("train", "val")]
        coco = {k: parts[0][k] for k in ("info", "licenses", "categories")}
        coco["images"] = sorted(parts[0]["images"] + parts[1]["images"], key=lambda im: im["id"])
        coco["annotations"] = sorted(parts[0]["annotations"] + parts[1]["annotations"], key=lambda a: a["id"])
        return coco, ref
    return synthetic_coco(nwpu_vhr10.load_split()), None


@pytest.mark.slow
def test_cli_with_the_shipped_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real split list end to end through the CLI; with the reference copy present, the written
    instances files are byte-identical to it."""
    coco, ref = _full_coco()
    md5s = write_fixture(tmp_path / "server", coco)
    out = tmp_path / "nwpu"
    argv = ["data", "download", "nwpu-vhr10", "--out", str(out), "--images-md5", md5s["images_md5"],
            "--annotations-md5", md5s["annotations_md5"], "--progress", "json"]
    with serve(tmp_path / "server") as (url, _):
        code = main([*argv, "--mirror", url])
        stdout, stderr = capsys.readouterr()
        assert code == 0, stderr
        assert "650 images, train 2989 objects, val 932 objects" in stdout
        events = [json.loads(line) for line in stderr.splitlines()]
        assert {e["stage"] for e in events} == {ZIP, ANN, "extract"} and events[-1]["done"] == 650
        assert main([*argv, "--mirror", url]) == 0
        assert "already downloaded and verified" in capsys.readouterr().out
    split = nwpu_vhr10.load_split()["splits"]
    assert len(list((out / "images").glob("*.jpg"))) == 650
    for name, spec in split.items():
        raw = (out / "annotations" / f"instances_{name}.json").read_bytes()
        data = json.loads(raw)
        assert [[im["file_name"], im["id"]] for im in data["images"]] == [e[:2] for e in spec["images"]]
        assert len(data["annotations"]) == spec["num_annotations"] == {"train": 2989, "val": 932}[name]
        assert [c["name"] for c in data["categories"]][:3] == ["airplane", "ship", "storage_tank"]
        if ref is not None:
            assert raw == (ref / f"instances_{name}.json").read_bytes()
    if ref is not None:
        assert "byte-identical to the reference copy" in stdout
