"""The collection layout: a dataset that is many images with a table, not one volume.

A source whose module says ``LAYOUT = "collection"`` provides ``open_collection(params, raw,
dataset) -> RawCollection`` instead of ``open_volume``. A :class:`RawCollection` lists
:class:`CollectionItem` s (an image id, the item's path inside that image's group, a way to open
it as a lazy :class:`~emdata.formats.raw.RawVolume`, its stored shape, dtype, axes and pixel size), one
table row per image, and any further tables (e.g. a well's annotation boxes). Items open one at
a time, so a study of thousands of files never holds thousands of open files.

The canonical HDF5 of a collection (``docs/architecture.md``)::

    /images/<image>/<path>     each item: 2D (axes "yx") or 3D (e.g. "tyx"), chunked, with the
                               spatial attributes and array_sha256/statistics of /raw
    /images/<image>/...        further tables of that image (compound datasets)
    /table                     one row per image (compound dataset; columns as the source gives)

Neutral like :mod:`emdata.formats.raw`: no HTTP, no source registry. Also reads the layout back for the
metadata record (:func:`collection_record`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from emdata.errors import FormatError
from emdata.h5 import hdf5
from emdata.formats.raw import RawVolume

LAYOUT_ATTR = "layout"
COLLECTION = "collection"
IMAGES = "images"
TABLE = "table"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # one HDF5 path component, no surprises
SPATIAL = "zyx"  # axis letters that carry a pixel size; others (t, c) do not


def spatial_axes(axes: str) -> str:
    return "".join(a for a in axes if a in SPATIAL)


@dataclass
class CollectionItem:
    """One array of one image: ``/images/<image>/<path>`` in the HDF5.

    ``open()`` returns a lazy ZYX :class:`RawVolume`: for a 2D item (``axes="yx"``) its shape is
    ``(1, Y, X)`` and the file stores ``(Y, X)``; for a 3D item (``"tyx"``, ``"zyx"``) the shape
    is stored as it is. ``pixel_size_nm`` has one entry per spatial axis of ``axes`` (y, x for
    "yx" and "tyx"), or is None when the format does not say (params.yaml must then).
    """

    image: str
    path: str
    open: Callable[[], RawVolume]
    shape: tuple[int, ...]  # as stored: (Y, X) for "yx", (T, Y, X) for "tyx"
    dtype: np.dtype
    axes: str = "yx"
    pixel_size_nm: tuple[float, ...] | None = None
    label: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)  # JSON-safe extras, stored as attributes
    source: str = ""  # the raw file(s) it comes from, for messages

    @property
    def name(self) -> str:
        return f"{IMAGES}/{self.image}/{self.path}"

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """The ZYX shape of the RawVolume ``open()`` returns."""
        return (1, *self.shape) if len(self.shape) == 2 else tuple(self.shape)  # type: ignore[return-value]


@dataclass
class RawCollection:
    """What ``open_collection`` returns: items, one table row per image, further tables."""

    dataset: str
    items: list[CollectionItem]
    table: list[dict[str, Any]]  # one row per image, key "image" first; flat JSON scalars
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # HDF5 path -> structured array

    def __enter__(self) -> "RawCollection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def images(self) -> list[str]:
        return [str(row["image"]) for row in self.table]

    def check(self) -> None:
        """Names are plain HDF5 path parts, paths unique, every item's image in the table."""
        seen: set[str] = set()
        ids = set(self.images())
        for item in self.items:
            parts = [item.image, *item.path.split("/")]
            if not all(NAME_PATTERN.fullmatch(p) for p in parts):
                raise FormatError(self.dataset, item.source or item.name, f"{item.name!r} is not a usable HDF5 path",
                                  "please report it: the source should have refused this name")
            if item.name in seen:
                raise FormatError(self.dataset, item.source or item.name, f"{item.name} appears twice",
                                  "check the raw folder for duplicate files")
            if item.image not in ids:
                raise FormatError(self.dataset, item.source or item.name, f"image {item.image!r} has no table row",
                                  "please report it (a source bug)")
            seen.add(item.name)


# -- tables: rows of flat scalars <-> numpy structured arrays (HDF5 compound datasets) ----------


def rows_to_array(rows: list[dict[str, Any]], where: str = "table") -> np.ndarray:
    """Rows (dicts with the same keys) as a structured array: bool, int64, float64 or UTF-8 bytes.

    Fixed-size fields keep the HDF5 bytes deterministic. ``None`` is allowed in float columns
    (stored as NaN) and string columns (stored as "").
    """
    if not rows:
        return np.zeros(0, [("image", "S1")])
    columns = list(rows[0])
    fields: list[tuple[str, np.dtype]] = []
    for col in columns:
        values = [row.get(col) for row in rows]
        present = [v for v in values if v is not None]
        if present and all(isinstance(v, (bool, np.bool_)) for v in present) and len(present) == len(values):
            fields.append((col, np.dtype("?")))
        elif present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present) \
                and len(present) == len(values):
            fields.append((col, np.dtype("<i8")))
        elif present and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
            fields.append((col, np.dtype("<f8")))
        elif all(isinstance(v, str) for v in present):
            width = max([len(v.encode()) for v in present] + [1])
            fields.append((col, np.dtype(f"S{width}")))
        else:
            raise ValueError(f"{where}: column {col!r} mixes types or holds non-scalars: {present[:3]!r}")
    out = np.zeros(len(rows), fields)
    for i, row in enumerate(rows):
        for col, dt in fields:
            value = row.get(col)
            if dt.kind == "S":
                out[col][i] = (value or "").encode()
            elif dt.kind == "f":
                out[col][i] = np.nan if value is None else value
            else:
                out[col][i] = value
    return out


def array_to_rows(array: np.ndarray) -> list[dict[str, Any]]:
    """A structured array back as JSON-safe rows (bytes decoded, NaN as None)."""
    rows = []
    names = array.dtype.names or ()
    for record in array:
        row: dict[str, Any] = {}
        for name in names:
            value = record[name]
            if isinstance(value, bytes):
                row[name] = value.decode("utf-8", "replace")
            elif isinstance(value, np.floating):
                row[name] = None if np.isnan(value) else float(value)
            elif isinstance(value, np.generic):
                row[name] = value.item()
            else:
                row[name] = value
        rows.append(row)
    return rows


# -- reading the layout back (metadata record, verify, access) ----------------------------------


def is_collection(f: Any) -> bool:
    value = f.attrs.get(LAYOUT_ATTR)
    return (value.decode() if isinstance(value, bytes) else value) == COLLECTION


def hashed_arrays(f: Any) -> list[str]:
    """Every dataset of the file that carries an ``array_sha256``, in name order."""
    import h5py

    names: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and "array_sha256" in obj.attrs:
            names.append(name)

    f.visititems(visit)
    return sorted(names)


def image_arrays(f: Any) -> dict[str, list[str]]:
    """image id -> paths of its arrays (relative to its group), from the file."""
    out: dict[str, list[str]] = {}
    prefix = IMAGES + "/"
    for name in hashed_arrays(f):
        if name.startswith(prefix):
            image, _, path = name[len(prefix):].partition("/")
            out.setdefault(image, []).append(path)
    return out


def _array_summary(dset: Any) -> dict[str, Any]:
    attrs = hdf5.read_attrs(dset)
    stats = json.loads(attrs["statistics"])
    return {"shape": list(dset.shape), "dtype": str(dset.dtype), "axes": attrs.get("axes"),
            "chunks": list(dset.chunks) if dset.chunks else None, "resolution": attrs.get("resolution"),
            "array_sha256": attrs["array_sha256"],
            "min": stats.get("min"), "max": stats.get("max"), "mean": stats.get("mean")}


def collection_record(f: Any) -> dict[str, Any]:
    """The collection part of a metadata record: table, per-array summary, per-role summary."""
    table = array_to_rows(f[TABLE][()]) if TABLE in f else []
    arrays = {}
    roles: dict[str, dict[str, Any]] = {}
    for name in hashed_arrays(f):
        if not name.startswith(IMAGES + "/"):
            continue
        info = _array_summary(f[name])
        arrays[name] = info
        role = _role(name.split("/", 2)[2])
        r = roles.setdefault(role, {"count": 0, "dtypes": [], "min": None, "max": None, "pixels": 0, "sum": 0.0})
        r["count"] += 1
        if info["dtype"] not in r["dtypes"]:
            r["dtypes"].append(info["dtype"])
        r["min"] = info["min"] if r["min"] is None else min(r["min"], info["min"])
        r["max"] = info["max"] if r["max"] is None else max(r["max"], info["max"])
        n = int(np.prod(info["shape"]))
        r["pixels"] += n
        r["sum"] += (info["mean"] or 0.0) * n
    for r in roles.values():
        r["mean"] = r.pop("sum") / r["pixels"] if r["pixels"] else None
    tables = sorted(name for name in _datasets(f) if name.startswith(IMAGES + "/") and name not in arrays
                    and f[name].dtype.names)
    columns = list(f[TABLE].dtype.names or ()) if TABLE in f else []
    return {"layout": COLLECTION, "n_images": len(table), "table": table, "table_columns": columns, "arrays": arrays,
            "roles": dict(sorted(roles.items())), "tables": tables}


def _role(path: str) -> str:
    """``inputs/BF_z3`` -> ``inputs/BF``; ``targets/Actin``, ``raw``, ``labels/organoids`` unchanged."""
    return re.sub(r"_z\d+$", "", path)


def _datasets(f: Any) -> Iterable[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names
