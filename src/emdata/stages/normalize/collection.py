"""A collection (many images with a table) -> one canonical HDF5, one array at a time.

The collection counterpart of a volume's writer (:mod:`emdata.stages.normalize.volume`): the same
root attributes, provenance, temporary file, check and publication, and every array streamed through
:func:`emdata.stages.normalize.write.write_volume` (tiles under the memory budget, exact statistics, voxel
sha256). Items are opened one at a time, so memory and open files do not grow with the number
of images. Layout (see :mod:`emdata.h5.collection` and docs/architecture.md)::

    /images/<image>/<path>   2D (Y, X) images, or (T, Y, X) series, chunked by normalize.image_chunks
    /images/<image>/label_stats/<name>/chunk_foreground   for label items
    /images/<image>/...      further tables of the source (compound datasets)
    /table                   one row per image (+ the pixel size each image was stored with)

Geometry is reconciled per item like a volume's (:mod:`emdata.core.geometry`): the pixel size the
format reports, params' ``voxel_size_nm`` (its y, x entries for 2D images) overriding, more than
1 % apart refused unless ``geometry_trust`` says whom to trust. Offsets are 0: the images of a
collection share no frame, unless params give ``offset_nm``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from emdata.core.geometry import Geometry, override
from emdata.core.progress import Progress
from emdata.errors import FormatError
from emdata.formats.raw import json_safe
from emdata.h5 import hdf5
from emdata.h5.collection import (
    COLLECTION,
    IMAGES,
    LAYOUT_ATTR,
    TABLE,
    CollectionItem,
    rows_to_array,
    spatial_axes,
)
from emdata.params.config import Config
from emdata.sources.fetch.record import FetchRecord
from emdata.stages.normalize.header import root_attrs, source_metadata, write_header
from emdata.stages.normalize.publish import publish, staged
from emdata.stages.normalize.write import KernelWarmer, check_free_space, write_volume
from emdata.sources.dataset import Dataset

log = logging.getLogger(__name__)


class _Silent:
    """A progress that ignores the voxel counts of one array (the collection counts arrays)."""

    def update(self, n: int) -> None:
        pass


def item_geometry(ds: Dataset, item: CollectionItem) -> Geometry:
    """Pixel size and offset of one item (one entry per spatial axis of ``item.axes``)."""
    key = ds.key
    n = len(spatial_axes(item.axes))
    # geometry's rules work per axis, for any number of axes (typed for volumes' three)
    params_voxel: Any = tuple(ds.voxel_size_nm[-n:]) if ds.voxel_size_nm else None
    params_offset: Any = tuple(ds.offset_nm[-n:]) if ds.offset_nm else None
    source: Any = item.pixel_size_nm
    try:
        voxel = override("voxel_size_nm", key, params_voxel, source, ds.geometry_trust,
                         source_names=ds.geometry_candidates)
        zero: Any = (0.0,) * n
        offset = override("offset_nm", key, params_offset, zero, ds.geometry_trust, scale=voxel.value,
                          source_names=ds.geometry_candidates)
    except FormatError as exc:  # name the image: a collection's images may disagree one by one
        raise FormatError(key, f"{exc.where} ({item.source or item.name})", exc.problem, exc.hint) from exc
    return Geometry(tuple(float(v) for v in voxel.value), tuple(float(v) for v in offset.value),  # type: ignore[arg-type]
                    {"voxel_size_nm": voxel.origin, "offset_nm": offset.origin.replace("source", "none (0)")})


def _merged_origin(geometries: list[Geometry]) -> dict[str, str]:
    out = {}
    for name in ("voxel_size_nm", "offset_nm"):
        seen = sorted({g.origin[name] for g in geometries})
        out[name] = " | ".join(seen) if seen else "none"
    return out


def _item_attrs(item: CollectionItem, geometry: Geometry) -> dict[str, Any]:
    attrs = hdf5.spatial_attrs(geometry.voxel_size_nm, geometry.offset_nm)
    attrs["axes"] = item.axes
    attrs["geometry_origin"] = json.dumps(geometry.origin, sort_keys=True)
    for name, value in sorted(json_safe(item.attrs).items()):
        attrs[name] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) and not _numbers(value) \
            else value
    return attrs


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) for v in value)


def _chunks(cfg: Config, item: CollectionItem) -> tuple[int, int, int]:
    """3D items with a z axis use normalize.chunks; images and time series normalize.image_chunks per plane."""
    if "z" in item.axes and len(item.shape) == 3:
        return cfg.normalize.chunks
    cy, cx = cfg.normalize.image_chunks
    return (1, cy, cx)


def _table_with_geometry(table: list[dict[str, Any]], items: list[CollectionItem],
                         geometries: dict[str, Geometry]) -> list[dict[str, Any]]:
    """Each row gets the (y, x) pixel size its image was stored with (its first item's)."""
    first: dict[str, Geometry] = {}
    for item in items:
        first.setdefault(item.image, geometries[item.name])
    rows = []
    for row in table:
        g = first.get(str(row["image"]))
        rows.append({**row, "pixel_size_y_nm": g.voxel_size_nm[-2] if g else None,
                     "pixel_size_x_nm": g.voxel_size_nm[-1] if g else None})
    return rows


def normalize_collection(cfg: Config, ds: Dataset, record: FetchRecord, out: Path) -> Path:
    """Write ``out`` (through a temporary file) from a collection source; publish it with its record."""
    key, raw = ds.key, ds.paths.raw
    params = cfg.normalize
    with staged(out) as tmp, KernelWarmer() as warm:
        with ds.module.open_collection(ds.source, raw, key) as coll:
            coll.check()
            if not coll.items:
                raise FormatError(key, str(raw), "the collection holds no images",
                                  f"check data/raw/{key} and the source params")
            warm.start()
            geometries = {item.name: item_geometry(ds, item) for item in coll.items}
            check_free_space(key, out, coll.items, params.compression)
            native, description = source_metadata(ds)
            table = _table_with_geometry(coll.table, coll.items, geometries)
            origin = Geometry((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), _merged_origin(list(geometries.values())))
            with hdf5.create(tmp, key) as f, \
                    Progress(len(coll.items), f"{key}: {len(coll.items)} arrays", unit="arrays") as progress:
                # one update: a volume's source_urls list would not fit an attribute for thousands of files
                write_header(f, {**root_attrs(cfg, ds, record, origin, description),
                                 **_collection_root_attrs(cfg, ds, record, len(table))}, record, native)
                for item in coll.items:
                    _write_item(f, key, item, geometries[item.name], cfg)
                    progress.update(1)
                try:
                    f.create_dataset(TABLE, data=rows_to_array(table, f"{key}: table"))
                except ValueError as exc:
                    raise FormatError(key, TABLE, str(exc), "please report it (a source bug)") from exc
                for name, array in sorted(coll.tables.items()):
                    f.create_dataset(name, data=array)
            _check_written(tmp, key, coll.items, len(table))
        publish(cfg, key, tmp, out)
    log.info("%s: wrote %s and %s", key, out, cfg.record_path(key))
    return out


def _collection_root_attrs(cfg: Config, ds: Dataset, record: FetchRecord, n_images: int) -> dict[str, Any]:
    """What differs from a volume's root attributes: layout, short URL and checksum lists, params.

    Files of an archive or an import folder are recorded as ``<archive or folder URL>#<member>``;
    the root lists each archive/folder once (attributes are limited to 64 KiB), with the
    checksums of what was transferred as a whole (``extra["sources"]``). Every file's URL, size
    and sha256 stay in ``/provenance/source_record``.
    """
    urls = sorted({f.url.split("#", 1)[0] for f in record.files.values()})
    whole = {s["url"]: s.get("sha256") for s in record.extra.get("sources", []) if isinstance(s, dict)}
    checksums = whole or {f.url: f.sha256 for f in record.files.values() if "#" not in f.url}
    normalize = {**cfg.normalize.to_dict(), "image_chunks": list(cfg.normalize.image_chunks)}
    return {
        LAYOUT_ATTR: COLLECTION,
        "n_images": n_images,
        "source_urls": json.dumps(urls),
        "source_checksums": json.dumps(checksums, sort_keys=True),
        "params": json.dumps({"dataset": json_safe(ds.raw_params), "normalize": normalize}, sort_keys=True),
    }


def _write_item(f: Any, key: str, item: CollectionItem, geometry: Geometry, cfg: Config) -> None:
    params = cfg.normalize
    with item.open() as volume:
        if tuple(volume.shape) != item.volume_shape:
            raise FormatError(key, item.source or item.name, f"reads as {tuple(volume.shape)} but was listed as "
                              f"{item.volume_shape}", "the file changed while normalize ran; run it again")
        result = write_volume(f, item.name, volume, chunks=_chunks(cfg, item), compression=params.compression,
                              level=params.compression_level, attrs=_item_attrs(item, geometry), label=item.label,
                              desc=f"{key}: {item.name}", budget=params.memory_budget, plane=len(item.shape) == 2,
                              progress=_Silent())
    if item.label:
        name = item.path.rsplit("/", 1)[-1]
        f.create_dataset(f"{IMAGES}/{item.image}/{hdf5.LABEL_STATS}/{name}/chunk_foreground",
                         data=result["foreground"])


def _check_written(path: Path, key: str, items: list[CollectionItem], rows: int) -> None:
    """Reopen the temporary file: every array complete, the table whole, before it gets its name."""
    with hdf5.open_read(path) as f:
        for item in items:
            dset = f.get(item.name)
            if dset is None or tuple(dset.shape) != tuple(item.shape) or "array_sha256" not in dset.attrs:
                raise FormatError(key, str(path), f"{item.name} was not written completely", "run normalize again")
        if TABLE not in f or f[TABLE].shape != (rows,):
            raise FormatError(key, str(path), "the image table was not written completely", "run normalize again")
        if items:
            last = items[-1]
            dset = f[last.name]
            dset[tuple(max(0, s - 1) for s in dset.shape)]  # the last chunk decodes
            np.asarray(dset.attrs["resolution"])
