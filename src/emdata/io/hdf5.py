"""The one writer and reader of the canonical HDF5 layout (docs/architecture.md, "HDF5 layout").

::

    /<ds>.h5     attrs: emdata_version, format_version, dataset, title, license, citation, ...
    /raw         3D ZYX, native dtype; attrs axes, unit, resolution, offset, element_size_um,
                 array_sha256, statistics (JSON)
    /labels/<n>  same conventions
    /label_stats/<n>/chunk_foreground   nonzero voxels per chunk of /labels/<n> (for samplers)

No timestamps are written, so identical inputs give bit-identical files (stable DVC hashes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
RAW = "raw"
LABELS = "labels"
LABEL_STATS = "label_stats"


def compression_options(compression: str, level: int) -> dict[str, Any]:
    """h5py ``create_dataset`` keywords for a compression name from params.yaml."""
    if compression == "none":
        return {}
    import hdf5plugin

    if compression == "zstd":
        return dict(hdf5plugin.Zstd(clevel=level))
    if compression == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=level, shuffle=hdf5plugin.Blosc.SHUFFLE))
    raise ValueError(f"unknown compression {compression!r}")


def chunk_shape(chunks: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """HDF5 needs chunks no larger than a fixed-size dataset."""
    return tuple(max(1, min(c, s)) for c, s in zip(chunks, shape))


def spatial_attrs(resolution_nm: tuple[float, ...], offset_nm: tuple[float, ...]) -> dict[str, Any]:
    """The attributes that make gunpowder, CREMI readers, Fiji and ilastik see the right scale."""
    return {
        "axes": "zyx",
        "unit": "nm",
        "resolution": np.asarray(resolution_nm, np.float64),
        "offset": np.asarray(offset_nm, np.float64),
        "element_size_um": np.asarray(resolution_nm, np.float64) / 1000.0,
    }


def open_read(path: Path, cache_bytes: int | None = None):
    """Open read-only without HDF5 file locking (safe on shared and read-only storage)."""
    import h5py

    kwargs: dict[str, Any] = {"locking": False}
    if cache_bytes:
        kwargs.update(rdcc_nbytes=int(cache_bytes), rdcc_nslots=1_000_003)
    return h5py.File(path, "r", **kwargs)


def attr_json(obj: Any, name: str) -> Any:
    value = obj.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return json.loads(value)


def read_attrs(obj: Any) -> dict[str, Any]:
    """Attributes as plain Python values (arrays to lists, bytes to str)."""
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, bytes):
            value = value.decode()
        out[key] = value
    return out
