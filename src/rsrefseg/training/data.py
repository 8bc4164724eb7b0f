"""Training-side data plumbing: a resumable seeded sampler, seeded flips, and a pre-resized cache.

- :class:`EpochBatchSampler` draws a fresh permutation per epoch from ``(seed, epoch)``, shards it
  across processes like ``DistributedSampler`` (padding by repeating the first indices), and can
  start at any batch of the epoch: a resumed run sees exactly the batches an uninterrupted run sees.
  It yields ``(index, aug_seed)`` pairs, so augmentation does not depend on worker RNG states.
  With ``per_image > 1`` (``data.expressions_per_image``) it permutes groups of up to that many
  expressions of the same image instead of single records; a group is contiguous in the epoch's
  order and shares one augmentation seed (the same flips for all its expressions).
- :class:`AugmentedView` applies seeded flips (with word rewriting) to the model-size sample.
- :class:`CachedDataset` stores every image resized to ``S x S`` once (uint8 ``.npy``, one row per
  image) plus the model-size masks (bit-packed), so an epoch reads memory instead of decoding JPEGs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from rsrefseg.data.datasets import ReferringDataset
from rsrefseg.data.records import decode_mask
from rsrefseg.data.transforms import flip_sample, make_meta, resize_image, resize_mask

#: Bump when the cache layout changes.
CACHE_VERSION = 1


class EpochBatchSampler:
    """Batches of ``(index, aug_seed)`` for one process, reproducible from ``(seed, epoch)``.

    Args:
        n: dataset length.
        batch_size: samples (expressions) per batch on this process.
        seed: run seed.
        shuffle: permute per epoch (else the natural order).
        rank, world_size: this process and the number of processes (shards of equal length).
        image_keys: the image of each record (e.g. its file name); needed when ``per_image > 1``.
        per_image: group up to this many expressions of one image (1 = records one by one).

    Grouped order (``per_image > 1``): each image's records are permuted and cut into groups of at
    most ``per_image``; the groups are permuted and laid out one after the other, each with one
    augmentation seed for all its records; batches are consecutive runs of ``batch_size`` records
    of that order (a group may straddle two batches). Every record is still visited once per
    epoch, and each process takes a contiguous part of the (padded) order, so groups stay together.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        image_keys: Sequence[Hashable] | None = None,
        per_image: int = 1,
    ) -> None:
        if n <= 0:
            raise ValueError("EpochBatchSampler needs a non-empty dataset")
        if per_image > 1 and (image_keys is None or len(image_keys) != n):
            raise ValueError("grouped sampling (per_image > 1) needs one image key per record")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_image = max(1, per_image)
        self.images: list[np.ndarray] = []  # record indices of each image, in order of first appearance
        if self.per_image > 1:
            assert image_keys is not None
            by_key: dict[Hashable, list[int]] = {}
            for index, key in enumerate(image_keys):
                by_key.setdefault(key, []).append(index)
            self.images = [np.asarray(indices) for indices in by_key.values()]
        self.epoch = 0
        self.start_batch = 0

    @property
    def per_rank(self) -> int:
        """Samples per process and epoch (the padded total divided by ``world_size``)."""
        return -(-self.n // self.world_size)

    def __len__(self) -> int:
        """Batches per epoch on this process (the last one may be smaller)."""
        return -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_batch`` batches."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's ``(indices, aug_seeds)`` for ``epoch``, each of length :attr:`per_rank`."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.per_image > 1:
            return self._grouped_order(rng)
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        seeds = rng.integers(0, 2**31 - 1, size=self.n)  # one augmentation seed per position
        total = self.per_rank * self.world_size
        padded = np.resize(order, total)  # repeats the first indices (DistributedSampler padding)
        pad_seeds = np.resize(seeds, total)
        return padded[self.rank :: self.world_size], pad_seeds[self.rank :: self.world_size]

    def _grouped_order(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The grouped order (see the class docstring) and this process's contiguous part of it."""
        groups: list[np.ndarray] = []
        for indices in self.images:
            indices = rng.permutation(indices) if self.shuffle else indices
            groups += [indices[lo : lo + self.per_image] for lo in range(0, len(indices), self.per_image)]
        picked = rng.permutation(len(groups)) if self.shuffle else np.arange(len(groups))
        group_seeds = rng.integers(0, 2**31 - 1, size=len(groups))  # one augmentation seed per group
        order = np.concatenate([groups[g] for g in picked])
        seeds = np.concatenate([np.full(len(groups[g]), group_seeds[k]) for k, g in enumerate(picked)])
        total = self.per_rank * self.world_size
        padded, pad_seeds = np.resize(order, total), np.resize(seeds, total)  # pad with the first records
        lo = self.rank * self.per_rank
        return padded[lo : lo + self.per_rank], pad_seeds[lo : lo + self.per_rank]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, seeds = self.epoch_order(self.epoch)
        for b in range(self.start_batch, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, len(indices))
            yield [(int(i), int(s)) for i, s in zip(indices[lo:hi], seeds[lo:hi])]


class AugmentedView(Dataset[dict[str, Any]]):
    """Index with ``(index, aug_seed)``: the base sample, flipped with probabilities ``p_h``/``p_v``.

    Flips act on the model-size ``3 x S x S`` image and ``1 x S x S`` mask (inside the content
    region for ``longest_side`` padding), with the expression's spatial words rewritten.
    """

    def __init__(self, base: Dataset[dict[str, Any]], p_h: float = 0.0, p_v: float = 0.0) -> None:
        self.base, self.p_h, self.p_v = base, p_h, p_v

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        item = dict(self.base[index])
        if self.p_h <= 0 and self.p_v <= 0:
            return item
        draws = torch.rand(2, generator=torch.Generator().manual_seed(seed))
        h, w = item["meta"].content_hw
        image = item["pixel_values"][:, :h, :w]  # 3 x S x S -> 3 x h x w content
        mask = item["mask"][:, :h, :w]  # 1 x S x S -> 1 x h x w content
        text = item["text"]
        for horizontal, p, draw in ((True, self.p_h, draws[0]), (False, self.p_v, draws[1])):
            if p > 0 and float(draw) < p:
                image, mask, text = flip_sample(image, mask, text, horizontal=horizontal)
        pixel_values = item["pixel_values"].clone()
        pixel_values[:, :h, :w] = image
        mask_full = item["mask"].clone()
        mask_full[:, :h, :w] = mask
        item.update(pixel_values=pixel_values, mask=mask_full, text=text)
        return item


def _cache_key(dataset: ReferringDataset) -> str:
    """Hash of everything a cached sample depends on (records, image folder and files, size, mode)."""
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{dataset.image_size}|{dataset.resize_mode}|{dataset.bands}|".encode())
    digest.update(str(dataset.image_dir.resolve()).encode())
    seen: set[str] = set()
    for record in dataset.records:
        digest.update(json.dumps(record.to_dict(), sort_keys=True, default=str).encode())
        if record.file_name not in seen:
            seen.add(record.file_name)
            try:
                stat = dataset.image_path(record).stat()
                digest.update(f"{record.file_name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"{record.file_name}|missing".encode())
    return digest.hexdigest()[:20]


class CachedDataset(Dataset[dict[str, Any]]):
    """A :class:`ReferringDataset` with images and masks pre-resized to ``S x S`` on disk.

    Items have the same keys as the base dataset; ``target`` (the original-resolution mask) is
    decoded from the record only when ``with_target`` is true (validation needs it, training not).
    Build with :meth:`build` (one process writes; the others call it after and just read).
    """

    def __init__(self, base: ReferringDataset, directory: Path, with_target: bool = True) -> None:
        self.base, self.directory, self.with_target = base, directory, with_target
        info = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        self.image_row: list[int] = info["image_row"]  # record -> row of images.npy
        self.orig_hw: list[tuple[int, int]] = [tuple(hw) for hw in info["orig_hw"]]  # type: ignore[misc]
        self.images = np.load(directory / "images.npy", mmap_mode="r")  # n_images x S x S x 3 uint8
        self.masks = np.load(directory / "masks.npy", mmap_mode="r")  # n_records x ceil(S*S/8) packed bits

    @property
    def records(self) -> list[Any]:
        return self.base.records

    def __len__(self) -> int:
        return len(self.base)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """Original-resolution ``(rgb, mask, record)`` (reads the image file; for overlays)."""
        return self.base.load(index)

    @classmethod
    def build(cls, base: ReferringDataset, cache_root: str | os.PathLike[str], with_target: bool = True,
              write: bool = True, progress: bool = False) -> CachedDataset:
        """Open the cache entry of ``base`` under ``cache_root``, writing it first if missing (and ``write``)."""
        directory = Path(cache_root) / _cache_key(base)
        if not (directory / "index.json").is_file():
            if not write:
                raise FileNotFoundError(f"cache entry {directory} is missing")
            _write_cache(base, directory, progress)
        return cls(base, directory, with_target)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.base.records[index]
        size = self.base.image_size
        orig_h, orig_w = self.orig_hw[index]
        meta = make_meta(orig_h, orig_w, size, self.base.resize_mode)
        image = torch.from_numpy(np.array(self.images[self.image_row[index]]))  # S x S x 3 uint8
        bits = np.unpackbits(np.asarray(self.masks[index]))[: size * size]  # packed -> S*S {0,1}
        mask = torch.from_numpy(bits.reshape(1, size, size).astype(np.float32))  # S*S -> 1 x S x S
        target = None
        if self.with_target:
            target = decode_mask(record.segmentation, orig_h, orig_w, source=record.source)
        return {
            "pixel_values": image.permute(2, 0, 1).contiguous(),  # S x S x 3 -> 3 x S x S
            "mask": mask,
            "text": record.sent,
            "index": index,
            "meta": meta,
            "target": target,
            "category": record.category_name,
            "rule": record.rule,
            "sample_id": record.sample_id or f"#{index}",
        }


def _write_cache(base: ReferringDataset, directory: Path, progress: bool) -> None:
    """Resize every image once (same code as the dataset) and every mask; write atomically (dir rename)."""
    from tqdm import tqdm

    size = base.image_size
    n = len(base)
    rows: dict[str, int] = {}
    hw_of: dict[str, tuple[int, int]] = {}
    image_row: list[int] = []
    orig_hw: list[list[int]] = []
    images: list[np.ndarray] = []
    packed = np.zeros((n, -(-size * size // 8)), dtype=np.uint8)
    for index in tqdm(range(n), desc=f"caching {base.image_dir.name} at {size}px", disable=not progress,
                      leave=False):
        record = base.records[index]
        if record.file_name not in rows:
            rgb, mask, _ = base.load(index)  # H x W x 3 uint8, H x W bool (mask size authoritative)
            pixel_values, _ = resize_image(rgb, size, base.resize_mode)  # 3 x S x S uint8
            rows[record.file_name] = len(images)
            hw_of[record.file_name] = (int(mask.shape[0]), int(mask.shape[1]))
            images.append(pixel_values.permute(1, 2, 0).numpy())  # 3 x S x S -> S x S x 3
        else:
            try:
                mask = decode_mask(record.segmentation, *hw_of[record.file_name], source=record.source)
            except Exception:
                _, mask, _ = base.load(index)  # a size disagreement: let the dataset handle it
        image_row.append(rows[record.file_name])
        orig_hw.append([int(mask.shape[0]), int(mask.shape[1])])
        meta = make_meta(mask.shape[0], mask.shape[1], size, base.resize_mode)
        packed[index] = np.packbits(resize_mask(mask, meta).numpy().reshape(-1))  # S x S -> packed bits
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8))
    np.save(tmp / "masks.npy", packed)
    (tmp / "index.json").write_text(json.dumps({"image_row": image_row, "orig_hw": orig_hw}), encoding="utf-8")
    try:
        os.replace(tmp, directory)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / "index.json").is_file():
            raise
