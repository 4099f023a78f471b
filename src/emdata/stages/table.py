"""data/metadata.csv: one row per dataset in params.yaml, from its record when built, else from params.

A pandas DataFrame of text cells (pandas is a pipeline dependency, loaded when the table is made).
Kept apart from :mod:`emdata.h5.metadata`, the record normalize writes, so that a change to the
table re-runs summarize only.
"""

from __future__ import annotations

from typing import Any

from emdata.params.config import Config, DatasetEntry

TABLE_COLUMNS = [
    "dataset", "title", "source_kind", "accession", "modality", "shape_zyx", "dtype", "voxel_size_nm_zyx",
    "extent_nm_zyx", "offset_nm_zyx", "min", "max", "mean", "std", "p0.1", "p99.9", "zero_fraction",
    "labels", "chunks", "compression", "bytes_on_disk", "file_sha256", "array_sha256", "license", "doi",
]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "x".join(_fmt(v) for v in value)
    return "" if value is None else str(value)


def _collection_row(key: str, r: dict[str, Any]) -> dict[str, Any]:
    """A collection's line of data/metadata.csv: counts and ranges over its images."""
    roles = r["roles"]
    arrays = list(r["arrays"].values())
    pixels = sorted({v for a in arrays for v in (a.get("resolution") or [])[-2:]})
    images = [a for name, a in r["arrays"].items() if "/labels/" not in name]
    count = sum(roles[k]["pixels"] for k in roles if not k.startswith("labels/"))
    mean = sum(roles[k]["mean"] * roles[k]["pixels"] for k in roles if not k.startswith("labels/")) / count \
        if count else None
    return {
        "dataset": key, "title": r["title"], "source_kind": r["source_kind"], "accession": r["accession"],
        "modality": r["modality"], "shape_zyx": f"{r['n_images']} images, {len(arrays)} arrays",
        "dtype": " ".join(sorted({a["dtype"] for a in arrays})),
        "voxel_size_nm_zyx": f"{pixels[0]:g}-{pixels[-1]:g}" if pixels else None, "extent_nm_zyx": None,
        "offset_nm_zyx": None, "min": min((a["min"] for a in images), default=None),
        "max": max((a["max"] for a in images), default=None), "mean": mean, "std": None, "p0.1": None,
        "p99.9": None, "zero_fraction": None,
        "labels": " ".join(sorted({k.split("/", 1)[1] for k in roles if k.startswith("labels/")})),
        "chunks": arrays[0]["chunks"] if arrays else None, "compression": r.get("compression"),
        "bytes_on_disk": r["bytes_on_disk"], "file_sha256": r["file_sha256"], "array_sha256": None,
        "license": r["license"], "doi": r["doi"],
    }


def planned_shape(ds: DatasetEntry) -> list[int] | None:
    """The (z, y, x) shape params fix before a build: a crop's size (``crop_size`` or ``roi.shape``)."""
    source = ds.raw_params.get("source") or {}
    roi = source.get("roi")
    shape = source.get("crop_size") or (roi.get("shape") if isinstance(roi, dict) else None)
    return list(shape) if isinstance(shape, list) and len(shape) == 3 else None


def params_row(ds: DatasetEntry) -> dict[str, Any]:
    """A dataset's line of data/metadata.csv before it is built: only what params.yaml says."""
    shape, voxel = planned_shape(ds), ds.voxel_size_nm
    return {
        "dataset": ds.key, "title": ds.title, "source_kind": ds.source_kind, "accession": ds.accession,
        "modality": ds.modality, "shape_zyx": shape, "voxel_size_nm_zyx": voxel,
        "extent_nm_zyx": [float(n * v) for n, v in zip(shape, voxel)] if shape and voxel else None,
        "offset_nm_zyx": ds.offset_nm, "license": ds.license, "doi": ds.doi,
    }


def _volume_row(key: str, r: dict[str, Any]) -> dict[str, Any]:
    stats = r["statistics"]
    pct = stats.get("percentiles") or {}
    return {
        "dataset": key, "title": r["title"], "source_kind": r["source_kind"], "accession": r["accession"],
        "modality": r["modality"], "shape_zyx": r["shape"], "dtype": r["dtype"],
        "voxel_size_nm_zyx": r["voxel_size_nm"], "extent_nm_zyx": r["extent_nm"], "offset_nm_zyx": r["offset_nm"],
        "min": stats.get("min"), "max": stats.get("max"), "mean": stats.get("mean"), "std": stats.get("std"),
        "p0.1": pct.get("p0.1"), "p99.9": pct.get("p99.9"), "zero_fraction": stats.get("zero_fraction"),
        "labels": " ".join(sorted(r["labels"])), "chunks": r["chunks"], "compression": r["compression"],
        "bytes_on_disk": r["bytes_on_disk"], "file_sha256": r["file_sha256"], "array_sha256": r["array_sha256"],
        "license": r["license"], "doi": r["doi"],
    }


def table_rows(cfg: Config, records: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per dataset in params.yaml, in key order: its record's values if built, else its params'."""
    rows = []
    for key in sorted(cfg.datasets):
        r = records.get(key)
        if r is None:
            row = params_row(cfg.datasets[key])
        elif r.get("layout") == "collection":
            row = _collection_row(key, r)
        else:
            row = _volume_row(key, r)
        rows.append({column: _fmt(row.get(column)) for column in TABLE_COLUMNS})
    return rows


def table_frame(cfg: Config, records: dict[str, dict[str, Any]]) -> Any:
    """The consolidated table as a pandas DataFrame of text cells (pandas: a pipeline dependency)."""
    import pandas as pd

    return pd.DataFrame(table_rows(cfg, records), columns=TABLE_COLUMNS, dtype=str)


def table_csv(cfg: Config, records: dict[str, dict[str, Any]]) -> str:
    """data/metadata.csv: :func:`table_frame` as CSV (text cells, so the bytes are what the rows say)."""
    return str(table_frame(cfg, records).to_csv(index=False, lineterminator="\n"))
