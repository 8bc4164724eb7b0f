"""A loopback HTTP server with ``Range`` support and fault injection, and NWPU-like fixture archives.

The server serves files from a folder on 127.0.0.1 (never the network). Faults: ``cut[name] = n``
sends the full ``Content-Length`` but closes the connection after ``n`` bytes (once);
``no_range`` ignores ``Range`` headers (answers 200 with the whole file). Every request is logged.
The fixture archive has the real release's layout: ``NWPU VHR-10 dataset/positive image set/NNN.jpg``,
a negative image set, ground-truth text files and a readme.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np


@dataclass
class ServerState:
    root: Path
    cut: dict[str, int] = field(default_factory=dict)
    no_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(http.server.BaseHTTPRequestHandler):
    state: ServerState

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        name = unquote(self.path.lstrip("/"))
        rng = self.headers.get("Range")
        self.state.requests.append((name, rng))
        path = self.state.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        start = 0
        if rng and not self.state.no_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = self.state.cut.pop(name, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, ServerState]]:
    """``(base URL, state)`` of a server on 127.0.0.1 serving ``root``, stopped on exit."""
    state = ServerState(root)
    handler = type("Handler", (_Handler,), {"state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG of the given size in a flat colour picked by ``seed`` (fast to encode at any size)."""
    from PIL import Image

    colour = tuple(int(c) for c in np.random.default_rng(seed).integers(0, 255, size=3))
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="JPEG", quality=20)
    return out.getvalue()


CATEGORIES = [{"supercategory": None, "id": i + 1, "name": n} for i, n in enumerate(
    ["airplane", "ship", "storage_tank", "baseball_diamond", "tennis_court", "basketball_court",
     "ground_track_field", "harbor", "bridge", "vehicle"])]


def synthetic_coco(split: dict[str, Any], size: tuple[int, int] = (24, 16)) -> dict[str, Any]:
    """An ``annotations.json`` with the split's images (ids, names, annotation counts), sorted by id."""
    entries = sorted((e for s in split["splits"].values() for e in s["images"]), key=lambda e: e[1])
    images, anns = [], []
    for file_name, image_id, _count in entries:
        images.append({"license": 0, "url": None, "file_name": file_name, "height": size[1], "width": size[0],
                       "date_captured": None, "id": image_id})
    ann_id = 0
    for _, image_id, count in entries:
        for _ in range(count):
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1 + (ann_id % 10),
                         "segmentation": [[1, 1, 6, 1, 6, 5, 1, 5]], "area": 20.0, "bbox": [1.0, 1.0, 5.0, 4.0],
                         "iscrowd": 0})
            ann_id += 1
    info = {"description": None, "url": None, "version": None, "year": 2019, "contributor": None,
            "date_created": "2019-07-15 20:39:41.721408"}
    return {"info": info, "licenses": [{"url": None, "id": 0, "name": None}], "categories": CATEGORIES,
            "images": images, "annotations": anns}


def small_split(n_train: int = 4, n_val: int = 2) -> dict[str, Any]:
    """A split list like the shipped asset, over images 001.jpg ... (ids 0 ...), shuffled order."""
    names = [(f"{k + 1:03d}.jpg", k, 1 + k % 3) for k in range(n_train + n_val)]
    order = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
    return {"splits": {"train": {"num_images": n_train, "num_annotations": sum(e[2] for e in order[:n_train]),
                                 "images": [list(e) for e in order[:n_train]]},
                       "val": {"num_images": n_val, "num_annotations": sum(e[2] for e in order[n_train:]),
                               "images": [list(e) for e in order[n_train:]]}}}


def write_fixture(root: Path, coco: dict[str, Any], members: list[tuple[str | zipfile.ZipInfo, bytes]] | None = None,
                  omit: frozenset[str] = frozenset()) -> dict[str, str]:
    """Write ``annotations.json`` and ``NWPU VHR-10 dataset.zip`` (images sized as ``coco`` says) into
    ``root``; ``members`` adds archive members ``(name or ZipInfo, data)``, ``omit`` leaves out those
    images. Returns the two files' MD5s."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotations.json").write_text(json.dumps(coco), encoding="utf-8")
    with zipfile.ZipFile(root / "NWPU VHR-10 dataset.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("NWPU VHR-10 dataset/readme.txt", "NWPU VHR-10 fixture\n")
        for im in coco["images"]:
            if im["file_name"] in omit:
                continue
            data = jpeg(im["width"], im["height"], im["id"])
            zf.writestr(f"NWPU VHR-10 dataset/positive image set/{im['file_name']}", data)
            zf.writestr(f"NWPU VHR-10 dataset/ground truth/{im['file_name'][:-4]}.txt", "(1,1),(5,5),1\n")
        zf.writestr("NWPU VHR-10 dataset/negative image set/001.jpg", jpeg(16, 16, 999))
        for name, data in members or []:
            zf.writestr(name, data)
    return {"images_md5": md5(root / "NWPU VHR-10 dataset.zip"), "annotations_md5": md5(root / "annotations.json")}
