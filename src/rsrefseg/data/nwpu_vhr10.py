"""``rsrefseg data download nwpu-vhr10``: NWPU VHR-10 from its public sources, in this project's layout.

The sources are the ones torchgeo's ``VHR10`` dataset documents: the images as
``NWPU VHR-10 dataset.zip`` and the COCO instance masks of chaozhong2010/VHR-10_dataset_coco
as ``annotations.json``, both on the Hugging Face dataset ``torchgeo/vhr10`` at a fixed revision
(the annotations also on GitHub at a fixed commit), each with its published MD5.
The result, under ``OUT``::

    images/NNN.jpg                       the 650 images of the positive image set
    annotations/instances_train.json     520 images, 2,989 objects (COCO, the same split as the
    annotations/instances_val.json       130 images,   932 objects   project's reference copy)
    README.md                            sources, checksums, citations, licence notes
    download.json                        written last: what was downloaded and verified

``OUT`` appears only when complete: everything is assembled in a temporary folder next to it and
renamed. The downloads wait in ``.<OUT name>.downloads/`` next to ``OUT`` (an interrupted one is
resumed by the next run) and are deleted after success unless ``keep_downloads``. A finished ``OUT``
is detected by ``download.json`` and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rsrefseg.data.download import DownloadError, ProgressFn, Source, exclusive_lock, extract_members, fetch
from rsrefseg.utils import current_umask

#: Hugging Face dataset torchgeo/vhr10 at the revision torchgeo pins.
HF_BASE = "https://hf.co/datasets/torchgeo/vhr10/resolve/7e7968ad265dadc4494e0ca4a079e0b63dc6f3f8/"
#: The annotations at the commit of chaozhong2010/VHR-10_dataset_coco that earlier torchgeo versions pinned.
GITHUB_ANNOTATIONS = ("https://raw.githubusercontent.com/chaozhong2010/VHR-10_dataset_coco/"
                      "ce0ba0f5f6a0737031f1cbe05e785ddd5ef05bd7/NWPU%20VHR-10_dataset_coco/annotations.json")
IMAGES_NAME, ANNOTATIONS_NAME = "NWPU VHR-10 dataset.zip", "annotations.json"
IMAGES_MD5, ANNOTATIONS_MD5 = "6add6751469c12dd8c8d6223064c6c4d", "7c76ec50c17a61bb0514050d20f22c08"
#: Environment variables overriding the sources (mirrors, tests against a local server).
MIRROR_ENV = "RSREFSEG_NWPU_MIRROR"
IMAGES_MD5_ENV, ANNOTATIONS_MD5_ENV = "RSREFSEG_NWPU_IMAGES_MD5", "RSREFSEG_NWPU_ANNOTATIONS_MD5"
#: Size limits: the archive, the annotations file, one image, all extracted images (far above the
#: real sizes: a ~75 MB archive of 650 images under 1 MB each).
MAX_ARCHIVE_BYTES, MAX_ANNOTATIONS_BYTES, MAX_IMAGE_BYTES = 2 << 30, 64 << 20, 64 << 20
MAX_IMAGES_BYTES = 4 << 30
MARKER = "download.json"
#: Archive members that are images of the positive set: ``.../positive image set/NNN.jpg``.
_POSITIVE = re.compile(r"(?:^|/)positive image set/(\d{3}\.jpg)$", re.IGNORECASE)


@dataclass
class DownloadResult:
    """What :func:`download_nwpu` did."""

    out: Path
    skipped: bool  # True when OUT was already a finished download
    images: int = 0
    annotations: dict[str, int] = field(default_factory=dict)  # split -> objects
    identical: dict[str, bool] = field(default_factory=dict)  # split -> byte-identical to the reference


def load_split(path: Path | None = None) -> dict[str, Any]:
    """The shipped split list (``rsrefseg/assets/nwpu_vhr10_split.json``) or another file like it."""
    if path is not None:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    text = resources.files("rsrefseg").joinpath("assets/nwpu_vhr10_split.json").read_text(encoding="utf-8")
    return json.loads(text)


def sources(mirror: str | None = None, images_md5: str | None = None,
            annotations_md5: str | None = None) -> tuple[Source, Source]:
    """(images, annotations) sources; arguments, then the environment variables, override the defaults."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    images_md5 = (images_md5 or os.environ.get(IMAGES_MD5_ENV) or IMAGES_MD5).lower()
    annotations_md5 = (annotations_md5 or os.environ.get(ANNOTATIONS_MD5_ENV) or ANNOTATIONS_MD5).lower()
    for what, value in (("images", images_md5), ("annotations", annotations_md5)):
        if not re.fullmatch(r"[0-9a-f]{32}", value):
            raise DownloadError(f"the {what} MD5 must be 32 hex digits, got {value!r}")
    if mirror:
        base = mirror if mirror.endswith("/") else mirror + "/"
        image_urls = (base + "NWPU%20VHR-10%20dataset.zip",)
        annotation_urls: tuple[str, ...] = (base + ANNOTATIONS_NAME,)
    else:
        image_urls = (HF_BASE + "NWPU%20VHR-10%20dataset.zip",)
        annotation_urls = (HF_BASE + ANNOTATIONS_NAME, GITHUB_ANNOTATIONS)
    return (Source(IMAGES_NAME, image_urls, images_md5, MAX_ARCHIVE_BYTES),
            Source(ANNOTATIONS_NAME, annotation_urls, annotations_md5, MAX_ANNOTATIONS_BYTES))


def is_complete(out: Path) -> bool:
    """``out`` holds a finished download (its marker and the files it lists)."""
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = marker.get("files", []) if isinstance(marker, dict) else []
    return bool(files) and all((out / name).is_file() for name in files)


def download_nwpu(
    out: str | Path,
    mirror: str | None = None,
    images_md5: str | None = None,
    annotations_md5: str | None = None,
    keep_downloads: bool = False,
    split: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> DownloadResult:
    """Download, verify and lay out NWPU VHR-10 under ``out`` (see the module docstring).

    Args:
        mirror: base URL holding ``NWPU%20VHR-10%20dataset.zip`` and ``annotations.json`` (default:
            the torchgeo Hugging Face revision, then GitHub for the annotations); env ``RSREFSEG_NWPU_MIRROR``.
        images_md5, annotations_md5: expected MD5s (default: the published ones; env
            ``RSREFSEG_NWPU_IMAGES_MD5`` / ``RSREFSEG_NWPU_ANNOTATIONS_MD5``).
        keep_downloads: keep the archive and annotations file after success.
        split: the split list (default: the shipped asset, :func:`load_split`).
        on_progress: ``(stage, done, total)`` callback (bytes while downloading, files while extracting).

    Raises:
        DownloadError: one line naming the URL or file: unreachable, interrupted (run again to
            resume), checksum mismatch, unsafe or incomplete archive, annotations that do not give
            the expected split. ``out`` is then left as it was.
    """
    out = Path(out).expanduser()
    if is_complete(out):
        return DownloadResult(out, skipped=True)
    try:
        return _download_nwpu(out, mirror, images_md5, annotations_md5, keep_downloads, split, on_progress)
    except OSError as exc:  # the file system: permissions, a full disk, a file where a folder should be
        raise DownloadError(f"{exc.filename or out}: {exc.strerror or exc}") from None


def _download_nwpu(out: Path, mirror: str | None, images_md5: str | None, annotations_md5: str | None,
                   keep_downloads: bool, split: dict[str, Any] | None, on_progress: ProgressFn | None
                   ) -> DownloadResult:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DownloadError(f"{out} exists and is not a finished NWPU VHR-10 download; remove it or choose "
                            "another --out")
    spec = split if split is not None else load_split()
    images_src, annotations_src = sources(mirror, images_md5, annotations_md5)
    out.parent.mkdir(parents=True, exist_ok=True)
    downloads = out.parent / f".{out.name}.downloads"
    with exclusive_lock(downloads / ".lock"):
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        annotations_file = fetch(annotations_src, downloads, on_progress)
        archive = fetch(images_src, downloads, on_progress)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            result = _assemble(staging, archive, annotations_file, spec, (images_src, annotations_src), on_progress)
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it 0700; give it a plain mkdir's mode
            if out.is_dir():
                out.rmdir()  # an empty folder made by the user
            os.rename(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    result.out = out
    return result


def _assemble(staging: Path, archive: Path, annotations_file: Path, spec: dict[str, Any],
              srcs: tuple[Source, Source], on_progress: ProgressFn | None) -> DownloadResult:
    gt = _read_annotations(annotations_file)
    wanted = {entry[0] for s in spec["splits"].values() for entry in s["images"]}
    (staging / "images").mkdir()
    written = extract_members(archive, lambda member: _image_name(member, wanted), staging / "images",
                              MAX_IMAGE_BYTES, on_progress, MAX_IMAGES_BYTES)
    missing = sorted(wanted - set(written))
    if missing:
        raise DownloadError(f"{archive}: {len(missing)} image(s) of the split are not in the archive's "
                            f"'positive image set' (first: {', '.join(missing[:3])})")
    _check_image_sizes(staging / "images", gt, annotations_file)
    result = DownloadResult(staging, skipped=False, images=len(written))
    (staging / "annotations").mkdir()
    files = [f"images/{name}" for name in sorted(written)]
    for split_name, split_spec in spec["splits"].items():
        text = split_annotations(gt, split_spec, annotations_file, split_name)
        name = f"annotations/instances_{split_name}.json"
        (staging / name).write_text(text, encoding="utf-8")
        files.append(name)
        result.annotations[split_name] = int(split_spec["num_annotations"])
        result.identical[split_name] = hashlib.sha256(text.encode("utf-8")).hexdigest() == split_spec.get("sha256")
    (staging / "README.md").write_text(_readme(srcs), encoding="utf-8")
    files.append("README.md")
    marker = {"dataset": "nwpu-vhr10", "files": files,
              "sources": [{"name": s.name, "urls": list(s.urls), "md5": s.md5} for s in srcs],
              "annotations": result.annotations, "identical_to_reference": result.identical}
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")  # last
    return result


def _image_name(member: str, wanted: set[str]) -> str | None:
    """The output name of an archive member (None = skip): only relative member paths without
    ``..`` components, ending in ``positive image set/NNN.jpg`` with NNN.jpg in the split."""
    parts = member.split("/")
    if member.startswith("/") or ".." in parts or re.match(r"^[A-Za-z]:", member):
        return None
    match = _POSITIVE.search(member)
    if match is None:
        return None
    name = match.group(1).lower()
    return name if name in wanted else None


def _read_annotations(path: Path) -> dict[str, Any]:
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DownloadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("images", "annotations", "categories")):
        raise DownloadError(f"{path}: not a COCO instances file (images, annotations, categories)")
    return gt


def split_annotations(gt: dict[str, Any], split_spec: dict[str, Any], source: Path, split_name: str) -> str:
    """One split's COCO instances JSON text: the spec's images in its order, each followed by its
    annotations in the file's order (the reference copy's layout, so the bytes can match it)."""
    by_name = {im.get("file_name"): im for im in gt["images"] if isinstance(im, dict)}
    per_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in gt["annotations"]:
        if isinstance(ann, dict):
            per_image.setdefault(ann.get("image_id"), []).append(ann)
    images, annotations = [], []
    for file_name, image_id, count in split_spec["images"]:
        image = by_name.get(file_name)
        if image is None or image.get("id") != image_id:
            raise DownloadError(f"{source}: image {file_name} (id {image_id}) of the {split_name} split is missing "
                                "or has another id")
        anns = per_image.get(image_id, [])
        if len(anns) != count:
            raise DownloadError(f"{source}: image {file_name} has {len(anns)} annotations, the {split_name} split "
                                f"expects {count}")
        images.append(image)
        annotations.extend(anns)
    data = {key: gt[key] for key in ("info", "licenses") if key in gt}
    data.update(categories=gt["categories"], images=images, annotations=annotations)
    return json.dumps(data, ensure_ascii=False)


def _check_image_sizes(folder: Path, gt: dict[str, Any], source: Path) -> None:
    """Every extracted image opens and has the width x height its annotations give."""
    from PIL import Image, UnidentifiedImageError

    sizes = {im.get("file_name"): (im.get("width"), im.get("height")) for im in gt["images"] if isinstance(im, dict)}
    for path in sorted(folder.iterdir()):
        try:
            with Image.open(path) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise DownloadError(f"{path.name} from the archive is not a readable image ({exc})") from None
        if path.name in sizes and size != sizes[path.name]:
            raise DownloadError(f"{path.name} from the archive is {size[0]}x{size[1]} but {source} says "
                                f"{sizes[path.name][0]}x{sizes[path.name][1]}")


def _readme(srcs: tuple[Source, Source]) -> str:
    lines = ["# NWPU VHR-10 (positive image set) with instance masks", "",
             "Written by `rsrefseg data download nwpu-vhr10`. Sources (MD5 verified):", ""]
    lines += [f"- `{s.name}` (MD5 `{s.md5}`): {', '.join(s.urls)}" for s in srcs]
    lines += ["", "- `images/NNN.jpg`: the 650 images of the positive image set.",
              "- `annotations/instances_{train,val}.json`: COCO instances, the 520 / 130 split shipped with",
              "  rsrefseg (`rsrefseg/assets/nwpu_vhr10_split.json`).", "",
              "For research use only. Cite Cheng et al., ISPRS J. Photogramm. Remote Sens. 98:119-132 (2014) and",
              "Cheng & Han, ISPRS J. Photogramm. Remote Sens. 117:11-28 (2016). The instance masks come from",
              "chaozhong2010/VHR-10_dataset_coco (MIT licence); torchgeo cites doi:10.1109/IGARSS.2019.8898573",
              "and doi:10.3390/rs12060989 for them.", ""]
    return "\n".join(lines)
