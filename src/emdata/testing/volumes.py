"""Small generated volumes whose values encode their coordinates, so axis mistakes show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from emdata.h5 import hdf5
from emdata.stages.normalize.volume import write_volume
from emdata.formats.raw import ArrayVolume


def coordinate_volume(shape: tuple[int, int, int], dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """``v[z, y, x]`` is a different mix of z, y and x per axis: a transpose or flip changes it."""
    z, y, x = np.indices(shape, dtype=np.int64)
    value = z * 1_000_003 + y * 1_009 + x * 7 + (z * y) % 13
    info = np.iinfo(dtype)
    span = int(info.max) - int(info.min) + 1
    return (value % span + info.min).astype(dtype)


def em_like_volume(shape: tuple[int, int, int], seed: int = 0, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """Smooth blobs plus noise, roughly like EM intensities (for thumbnails and benchmarks)."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(0, 2 * np.pi * k, n)[:, None, None] for k, n in zip((2, 3, 4), shape))
    base = np.sin(z) + np.cos(y.reshape(1, -1, 1)) * np.sin(x.reshape(1, 1, -1))
    noisy = 128 + 50 * base + rng.normal(0, 20, shape)
    return np.clip(noisy, 0, 255).astype(dtype)


def blob_labels(shape: tuple[int, int, int], seed: int = 0, count: int = 3, value: int = 255) -> np.ndarray:
    """A uint8 mask of a few ellipsoids (the EPFL ground truth uses 0/255)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    mask = np.zeros(shape, np.uint8)
    for _ in range(count):
        centre = [rng.uniform(0, s) for s in shape]
        radius = [max(1.5, s / 5) for s in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) <= 1
        mask[inside] = value
    return mask


def write_tiff_stack(path: Path, volume: np.ndarray, *, byteorder: str = "<", **kwargs: object) -> Path:
    """A classic multipage TIFF, one page per Z section, as the EPFL files are."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=False, byteorder=byteorder) as writer:
        for section in volume:
            writer.write(section, contiguous=True, photometric="minisblack", **kwargs)
    return path


def write_libtiff_stack(path: Path, volume: np.ndarray) -> Path:
    """A multipage TIFF as libtiff writes it: each page's strip data first, then its directory.

    Pillow saves through libtiff when asked (``WRITE_LIBTIFF``); tifffile writes each directory
    before its data, so it cannot make this layout."""
    from PIL import Image, TiffImagePlugin

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.ascontiguousarray(plane)) for plane in volume]
    saved = TiffImagePlugin.WRITE_LIBTIFF
    TiffImagePlugin.WRITE_LIBTIFF = True
    try:
        images[0].save(path, save_all=True, append_images=images[1:], compression="raw")
    finally:
        TiffImagePlugin.WRITE_LIBTIFF = saved
    return path


def write_canonical(path: Path, raw: np.ndarray, *, labels: dict[str, np.ndarray] | None = None,
                    chunks: tuple[int, int, int] = (8, 16, 16), resolution: tuple[float, ...] = (5.0, 5.0, 5.0),
                    offset: tuple[float, ...] = (0.0, 0.0, 0.0), compression: str = "none") -> Path:
    """A canonical emdata HDF5 from arrays, through the same writer as ``emdata normalize``."""
    import h5py


    path.parent.mkdir(parents=True, exist_ok=True)
    common = dict(chunks=chunks, compression=compression, level=3, attrs=hdf5.spatial_attrs(resolution, offset))
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset": path.stem, "format_version": hdf5.FORMAT_VERSION, "title": path.stem})
        write_volume(f, hdf5.RAW, ArrayVolume(raw, path.stem), label=False, desc="raw", **common)
        for name, array in (labels or {}).items():
            result = write_volume(f, f"{hdf5.LABELS}/{name}", ArrayVolume(array, path.stem), label=True,
                                  desc=name, **common)
            f.create_dataset(f"{hdf5.LABEL_STATS}/{name}/chunk_foreground", data=result["foreground"])
    return path
