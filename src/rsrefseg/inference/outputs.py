"""Files written for each (image, expression) prediction, and the run summary.

Layout under the output folder ``OUT``::

    OUT/<image-dir>/<nn>_<slug>.mask.png      H x W, 0 / 255 (every image)
    OUT/<image-dir>/<nn>_<slug>.overlay.png   image + tinted mask + outline + expression as title
    OUT/<image-dir>/<nn>_<slug>.mask.tif      uint8 0/255 Cloud Optimized GeoTIFF, source CRS and
                                              transform, optional band 2 "probability" (geo only)
    OUT/<image-dir>/<nn>_<slug>.geojson       polygons in the source CRS (geo only)
    OUT/summary.json                          everything written, and the failures

``<image-dir>`` is the image's file stem (``-2``, ``-3``... appended when two inputs share a stem),
``<nn>`` the 1-based expression number (zero-padded to two digits or more) and ``<slug>`` a
lower-case ASCII slug of the expression. Overlays of images larger than ``overlay_max_side`` are
downscaled previews (the mask is reduced with "any" pooling, so thin objects stay visible); mask
PNG/GeoTIFF/GeoJSON are always at full resolution. Every file is written atomically.

Polygon options are in **CRS units** (georeferenced images are the only ones with polygons):
``simplify`` is a Douglas-Peucker tolerance in CRS units and ``min_area`` drops polygons smaller than
``min_area`` CRS units squared (m and m² for metric projections, degrees for EPSG:4326).

Tiled scenes are written window by window instead (:mod:`rsrefseg.inference.scene_writer`: the
same files, except the mask PNG of scenes above ``MASK_PNG_MAX_PIXELS``).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsrefseg.inference.geo import (
    GeoReference,
    mask_to_polygons,
    polygons_to_feature_collection,
    write_geojson,
)
from rsrefseg.inference.predictor import Prediction
from rsrefseg.utils import atomic_save, atomic_write_json

__all__ = [
    "expression_names",
    "image_dir_names",
    "merge_summaries",
    "overlay_image",
    "peak_rss_mb",
    "remove_prediction_files",
    "slugify",
    "unique_names",
    "write_mask_png",
    "write_overlay_png",
    "write_prediction_outputs",
    "write_summary",
]

#: Tint (RGB) and opacity of the mask in overlays, and the outline colour.
TINT, TINT_ALPHA, OUTLINE = (255, 40, 40), 0.45, (255, 235, 0)


def slugify(text: str, max_length: int = 48) -> str:
    """Lower-case ASCII slug of ``text`` (``"The ship, left!"`` -> ``"the-ship-left"``); ``"expr"`` if empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "expr"


def expression_names(expressions: Sequence[str]) -> list[str]:
    """``<nn>_<slug>`` file-name stems, 1-based and zero-padded to at least two digits."""
    width = max(2, len(str(len(expressions))))
    return [f"{i:0{width}d}_{slugify(text)}" for i, text in enumerate(expressions, start=1)]


def image_dir_names(paths: Sequence[Path]) -> list[str]:
    """Output folder name of each input: its stem, made unique in input order (``x``, ``x-2``...)."""
    return unique_names([path.stem for path in paths])


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` made unique in order by suffixes (``x``, ``x-2``, ``x-3``...; empty -> ``image``)."""
    taken: set[str] = set()
    out = []
    for name in names:
        base, candidate, n = name or "image", name or "image", 1
        while candidate.lower() in taken:  # case-insensitive: also unique on macOS/Windows disks
            n += 1
            candidate = f"{base}-{n}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write an ``H x W`` bool mask as an 8-bit grey PNG (0 / 255), atomically."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def _reduce_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``H x W`` bool -> ``h x w`` bool by "any" pooling (box filter > 0)."""
    if mask.shape == shape:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BOX)) > 0


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` (``h x w`` bool) within ``thickness`` pixels of its 4-connected border."""
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)  # h x w -> (h+2) x (w+2)
        inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
                 & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def overlay_image(rgb: np.ndarray, mask: np.ndarray, title: str) -> Image.Image:
    """Tint ``mask`` over ``rgb`` (``h x w x 3`` uint8, same ``h x w``), outline it, add a title bar."""
    h, w = mask.shape
    out = rgb.astype(np.float32)
    out[mask] = out[mask] * (1.0 - TINT_ALPHA) + np.float32(TINT) * TINT_ALPHA
    out[_boundary(mask, max(1, max(h, w) // 600))] = OUTLINE
    body = Image.fromarray(out.round().astype(np.uint8), mode="RGB")
    size = max(12, min(32, w // 40))
    font = _font(size)
    bar = int(size * 1.6)
    canvas = Image.new("RGB", (w, h + bar), (0, 0, 0))
    canvas.paste(body, (0, bar))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, (bar - size) // 2), fit_text(draw, title, font, w - 8), fill=(255, 255, 255), font=font)
    return canvas


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text``, or its longest prefix + "…" that is at most ``width`` pixels wide.

    A binary search over the prefix length after a cut at ``width`` characters (no glyph is
    narrower than one pixel): O(log n) text measurements of at most ``width`` characters each,
    whatever the length of ``text``.
    """
    if len(text) <= width and draw.textlength(text, font=font) <= width:
        return text
    text = text[: max(1, int(width))]
    lo, hi = 0, len(text)  # the answer n: the largest prefix length with text[:n] + "…" fitting
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def write_overlay_png(
    path: str | os.PathLike[str], rgb: np.ndarray, mask: np.ndarray, title: str
) -> None:
    """Write :func:`overlay_image` as PNG, atomically; a full-size ``mask`` is reduced to ``rgb``'s size."""
    image = overlay_image(rgb, _reduce_mask(mask, rgb.shape[:2]), title)
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def heatmap_image(preview: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend the ``H x W`` [0, 1] ``heat`` (resized to the preview) in the ``inferno`` colormap over
    ``preview`` (``h x w x 3`` uint8); returns ``h x w x 3`` uint8."""
    from matplotlib import colormaps

    h, w = preview.shape[:2]
    small = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    colours = colormaps["inferno"](np.clip(small, 0.0, 1.0))[..., :3] * 255.0  # h x w x 3
    return (preview.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def write_heatmap_png(path: str | os.PathLike[str], preview: np.ndarray, heat: np.ndarray) -> None:
    """Write :func:`heatmap_image` as PNG, atomically."""
    image = Image.fromarray(heatmap_image(preview, heat))
    atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def _geo_outputs(
    base: Path,
    prediction: Prediction,
    georef: GeoReference,
    source: str,
    simplify: float,
    min_area: float,
    probability: np.ndarray | None,
    collect: list[Any] | None,
) -> dict[str, Any]:
    """Write ``<base>.mask.tif`` (Cloud Optimized GeoTIFF, optional probability band) and
    ``<base>.geojson``; return their summary fields."""
    from rsrefseg.inference.cog import COGMaskWriter

    tags = {"expression": prediction.expression, "score": f"{prediction.score:.6f}", "source": source}
    height, width = prediction.mask.shape
    with COGMaskWriter(f"{base}.mask.tif", height, width, georef.crs, georef.transform,
                       probability=probability is not None, tags=tags) as cog:
        cog.write(0, 0, prediction.mask, probability)
    polygons = mask_to_polygons(prediction.mask, georef.transform, simplify_tolerance=simplify, min_area=min_area)
    if collect is not None:
        collect.extend(polygons)
    properties = {"expression": prediction.expression, "score": prediction.score, "source": source}
    collection = polygons_to_feature_collection(polygons, georef.crs, properties)
    write_geojson(f"{base}.geojson", collection)
    areas = [f["properties"]["area_m2"] for f in collection["features"]]
    known = all(a is not None for a in areas)
    return {
        "mask_tif": f"{base.name}.mask.tif",
        "geojson": f"{base.name}.geojson",
        "polygons": len(polygons),
        "area_m2": float(sum(areas)) if known else None,
    }


def write_prediction_outputs(
    folder: Path,
    name: str,
    prediction: Prediction,
    preview: np.ndarray,
    source: str,
    georef: GeoReference | None,
    simplify: float = 0.0,
    min_area: float = 0.0,
    probability: bool = False,
    valid: np.ndarray | None = None,
    collect: list[Any] | None = None,
) -> dict[str, Any]:
    """Write every file of one prediction into ``folder`` (see the module docstring).

    Args:
        folder: The image's output folder.
        name: ``<nn>_<slug>`` file-name stem.
        prediction: The prediction (full-resolution ``H x W`` mask; its heatmap, when it has one,
            is written as ``<name>.heatmap.png``).
        preview: ``h x w x 3`` uint8 RGB for the overlay (the image, or a downscaled preview).
        source: Source file, recorded in the GeoTIFF tags and GeoJSON properties.
        georef: Georeferencing; ``None`` writes no GeoTIFF/GeoJSON.
        simplify, min_area: Polygon options in CRS units and CRS units squared.
        probability: Add the ``probability`` band (``round(255 * sigmoid(logit))``, 0 where
            ``valid`` is False) to the mask GeoTIFF.
        valid: ``H x W`` validity of the image (for the probability band).
        collect: When given, the polygons (CRS units) are appended to it (for a vector file of
            all expressions).

    Returns:
        The summary record: file names (relative to ``folder``), score, mask pixels, polygons.
    """
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / name
    write_mask_png(f"{base}.mask.png", prediction.mask)
    title = f'{name.split("_", 1)[0]}. "{prediction.expression}"  score {prediction.score:.2f}'
    write_overlay_png(f"{base}.overlay.png", preview, prediction.mask, title)
    record: dict[str, Any] = {
        "expression": prediction.expression,
        "score": prediction.score,
        "predicted_iou": prediction.predicted_iou,
        "mask_pixels": prediction.area_pixels,
        "mask_png": f"{name}.mask.png",
        "overlay_png": f"{name}.overlay.png",
    }
    if prediction.heatmap is not None:
        write_heatmap_png(f"{base}.heatmap.png", preview, prediction.heatmap)
        record["heatmap_png"] = f"{name}.heatmap.png"
    if georef is not None:
        band = None
        if probability:
            from rsrefseg.inference.cog import probability_uint8

            band = probability_uint8(prediction.logits)
            if valid is not None:
                band[~valid] = 0
        record.update(_geo_outputs(base, prediction, georef, source, simplify, min_area, band, collect))
    return record


#: Suffixes of the files of one prediction (``<name><suffix>``).
PREDICTION_SUFFIXES = (".mask.png", ".overlay.png", ".heatmap.png", ".mask.tif", ".geojson")


def remove_prediction_files(folder: Path, name: str) -> None:
    """Remove the files of prediction ``name`` in ``folder`` (after it was interrupted half-way, so
    that no file is on disk that the summary does not list)."""
    for suffix in PREDICTION_SUFFIXES:
        (folder / f"{name}{suffix}").unlink(missing_ok=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` also counts
    the peak of the parent that forked this process before ``exec`` (a CLI started from a 1 GB
    test runner would report at least 1 GB). Elsewhere it is ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # "VmHWM:  123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """Write the run summary JSON atomically."""
    atomic_write_json(path, summary)


def merge_summaries(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge per-rank summaries: images and failures in input order, one ``ranks`` entry per part."""
    if not parts:
        raise ValueError("no summary to merge")
    merged = {k: v for k, v in parts[0].items() if k not in ("images", "failures", "rank", "peak_rss_mb")}
    merged["images"] = sorted((i for p in parts for i in p["images"]), key=lambda i: i["input_index"])
    merged["failures"] = sorted((f for p in parts for f in p["failures"]), key=lambda f: f["input_index"])
    merged["ranks"] = [
        {"rank": p.get("rank", 0), "images": len(p["images"]), "failures": len(p["failures"]),
         "peak_rss_mb": p.get("peak_rss_mb")}
        for p in sorted(parts, key=lambda p: p.get("rank", 0))
    ]
    merged["peak_rss_mb"] = max((p.get("peak_rss_mb") or 0.0) for p in parts)
    merged["outputs"] = sum(len(i["outputs"]) for i in merged["images"])
    return merged
