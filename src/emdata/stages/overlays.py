"""What the labels mark, for the summary: label overlays on the central sections and an intensity histogram.

Semantic masks (small integer classes) are a tinted fill, one colour per class; instance labels
(ids of 32 bits or more, such as uint64 body ids) are coloured regions with outlines, each id's
colour derived from the id alone, so the same object has the same colour in XY and XZ and in every
build. Pillow only, no time chunk: the same sections give the same PNG bytes. The census
(classes or objects of a whole label volume) reads the label one chunk layer at a time.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from emdata.h5 import hdf5

SEMANTIC_ALPHA = 0.45  # how much of a class's colour covers the image
INSTANCE_ALPHA = 0.35  # fainter: the outlines carry the shapes
# Distinct, colour-blind-friendly class colours (class 1 first; classes beyond wrap around).
PALETTE = np.array([(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                    (204, 121, 167), (255, 255, 255)], dtype=np.float64)
HISTOGRAM_SIZE = (256, 80)  # width, height in pixels
HISTOGRAM_BINS = 128
WINDOW_SHADE = (225, 235, 250)  # the display window (p0.1..p99.9) behind the bars
CLASSES_LISTED = 8  # a census names at most this many class values


def is_instance(dtype: Any) -> bool:
    """Ids of 32 bits or more are instances (objects); narrower integers are semantic classes."""
    dt = np.dtype(dtype)
    return dt.kind in "iu" and dt.itemsize >= 4


def thumbnail_size(shape: tuple[int, int], pixel_hw: tuple[float, float], longest: int) -> tuple[int, int]:
    """(width, height) of a section's thumbnail: the physical aspect ratio, the longest side ``longest``."""
    height_nm, width_nm = shape[0] * pixel_hw[0], shape[1] * pixel_hw[1]
    scale = longest / max(height_nm, width_nm)
    return max(1, round(width_nm * scale)), max(1, round(height_nm * scale))


def nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``labels`` resampled to ``size`` (width, height) by the nearest voxel: ids are never mixed."""
    rows = ((np.arange(size[1]) + 0.5) * labels.shape[0] / size[1]).astype(np.intp)
    cols = ((np.arange(size[0]) + 0.5) * labels.shape[1] / size[0]).astype(np.intp)
    return labels[np.ix_(rows, cols)]


def instance_colours(ids: np.ndarray) -> np.ndarray:
    """A bright colour per id (float RGB, 0-255), from a 64-bit mix of the id: neighbours differ."""
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):  # splitmix64: wrapping multiplication is the point
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    hue = (x >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    # HSV (s 0.7, v 1) to RGB: each channel from the hue's distance to its own phase.
    k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6.0) % 6.0
    return 255.0 * (1.0 - 0.7 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels of an object whose right or lower (or left or upper) neighbour holds another id."""
    edge = np.zeros(labels.shape, dtype=bool)
    step_y, step_x = labels[1:, :] != labels[:-1, :], labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= step_y
    edge[:-1, :] |= step_y
    edge[:, 1:] |= step_x
    edge[:, :-1] |= step_x
    return edge & (labels != 0)


def overlay_rgb(grey: np.ndarray, labels: np.ndarray, instance: bool) -> np.ndarray:
    """``grey`` (uint8) with the non-zero ``labels`` (same shape) drawn over it, as uint8 RGB."""
    rgb = np.repeat(grey.astype(np.float64)[..., None], 3, axis=2)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if instance:
        colours, alpha = instance_colours(ids), INSTANCE_ALPHA
    else:
        colours, alpha = PALETTE[(ids.astype(np.int64) - 1) % len(PALETTE)], SEMANTIC_ALPHA
    colour = colours[inverse]
    inside = labels != 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colour[inside]
    if instance:
        edge = outlines(labels)
        rgb[edge] = colour[edge]
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # Pillow writes no time chunk: deterministic bytes
    return buf.getvalue()


def overlay_png(grey: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> bytes:
    """A thumbnail of ``size`` (width, height): ``grey`` (uint8, full size) box-filtered, ``labels`` over it."""
    from PIL import Image

    small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BOX))
    return png_bytes(Image.fromarray(overlay_rgb(small, nearest(labels, size), is_instance(labels.dtype))))


def histogram_png(values: np.ndarray, window: tuple[float, float]) -> bytes:
    """Bars of the counts of ``values`` between their min and max, the display ``window`` shaded behind them."""
    from PIL import Image, ImageDraw

    width, height = HISTOGRAM_SIZE
    flat = values.ravel().astype(np.float64)
    low, high = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 1.0)
    high = high if high > low else low + 1.0
    counts, _ = np.histogram(flat, bins=HISTOGRAM_BINS, range=(low, high))
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, x1 = ((np.array(window, dtype=np.float64) - low) / (high - low) * width).clip(0, width)
    draw.rectangle([int(x0), 0, max(int(x0), int(x1) - 1), height - 1], fill=WINDOW_SHADE)
    bar = width // HISTOGRAM_BINS
    peak = max(int(counts.max()), 1)
    for i, count in enumerate(counts):
        top = height - 1 - round((height - 2) * int(count) / peak)
        if count:
            draw.rectangle([i * bar, top, (i + 1) * bar - 1, height - 1], fill=(60, 60, 60))
    return png_bytes(image)


def label_sections(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each label's central XY and XZ sections (the same planes as ``h5.metadata.central_slices``)."""
    with hdf5.open_read(path) as f:
        out = {}
        for name, dset in sorted(f.get(hdf5.LABELS, {}).items()):
            z, y, _ = dset.shape
            out[name] = (dset[z // 2], dset[:, y // 2, :])
        return out


def objects(count: int) -> str:
    """``"1,234 objects"``: how the summary names an instance label's size."""
    return f"{count:,} object{'s' if count != 1 else ''}"


def label_census(path: Path, name: str) -> str:
    """``"2 classes: values 1, 2"`` or ``"1,234 objects"``: the distinct non-zero values, one chunk layer at a time."""
    with hdf5.open_read(path) as f:
        dset = f[f"{hdf5.LABELS}/{name}"]
        layer = dset.chunks[0] if dset.chunks else 1
        seen = np.zeros(0, dtype=dset.dtype)
        for z in range(0, dset.shape[0], layer):
            seen = np.union1d(seen, np.unique(dset[z:z + layer]))
        instance = is_instance(dset.dtype)
    values = seen[seen != 0]
    if instance:
        return objects(values.size)
    shown = ", ".join(str(v) for v in values[:CLASSES_LISTED]) + (", ..." if values.size > CLASSES_LISTED else "")
    plural = values.size != 1
    return f"{values.size} class{'es' if plural else ''}" + (f": value{'s' if plural else ''} {shown}" if values.size else "")
