"""Raw source volume -> canonical HDF5, slab by slab, in bounded memory.

One slab is one chunk deep in Z, so every write covers whole chunks (no read-modify-write).
While the main thread writes slab k, one worker thread reads slab k+1 and another hashes slab k
and adds it to the exact statistics; file reads, HDF5 writes, sha256 and bincount release the
GIL for most of their work, so the two cores overlap. At most two slabs are alive at once. The
file is written under a temporary name, checked, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Config
from .errors import FormatError, NotBuiltError
from .io import hdf5
from .progress import Progress
from .sources import get_source
from .sources.base import RawVolume, json_safe
from .stats import StreamingStats

log = logging.getLogger(__name__)
SOURCE_RECORD = "source.json"


class _Digest:
    """sha256 of the voxels in C order, little-endian; exact statistics; label foreground."""

    def __init__(self, dtype: np.dtype, chunks: tuple[int, ...], shape: tuple[int, ...], label: bool) -> None:
        self.sha = hashlib.sha256()
        self.stats = StreamingStats(dtype)
        self.chunks = chunks
        grid = tuple(-(-s // c) for s, c in zip(shape, chunks))
        self.foreground = np.zeros(grid, np.int64) if label else None

    def update(self, z0: int, slab: np.ndarray) -> None:
        self.sha.update(hdf5.voxel_bytes(slab))
        self.stats.update(slab)
        if self.foreground is not None:
            self.foreground[z0 // self.chunks[0]] += _chunk_counts(slab != 0, self.chunks[1:])


def _chunk_counts(mask: np.ndarray, chunk_yx: tuple[int, ...]) -> np.ndarray:
    """Number of True voxels per (y, x) chunk column of a slab."""
    cy, cx = chunk_yx
    ny, nx = -(-mask.shape[1] // cy), -(-mask.shape[2] // cx)
    padded = np.zeros((mask.shape[0], ny * cy, nx * cx), bool)
    padded[:, : mask.shape[1], : mask.shape[2]] = mask
    return padded.reshape(mask.shape[0], ny, cy, nx, cx).sum(axis=(0, 2, 4))


def write_volume(group: Any, name: str, volume: RawVolume, *, chunks: tuple[int, int, int],
                 compression: str, level: int, attrs: dict[str, Any], label: bool, desc: str) -> dict[str, Any]:
    """Stream ``volume`` into dataset ``name``; return its sha256, statistics and chunk counts."""
    shape = tuple(volume.shape)
    chunk = hdf5.chunk_shape(chunks, shape)
    dset = group.create_dataset(name, shape=shape, dtype=volume.dtype, chunks=chunk, fillvalue=0,
                                **hdf5.compression_options(compression, level))
    digest = _Digest(volume.dtype, chunk, shape, label)
    depth = chunk[0]
    starts = list(range(0, shape[0], depth))
    dataset_name = getattr(volume, "dataset", "?")

    def read(z0: int) -> np.ndarray:
        z1 = min(shape[0], z0 + depth)
        slab = volume.read(z0, z1)
        if slab.shape != (z1 - z0, *shape[1:]):
            raise FormatError(dataset_name, desc, f"read {slab.shape} for sections {z0}..{z1 - 1}, "
                              f"expected {shape[1:]}")
        return slab

    # Three stages overlap: read slab k+1 | write slab k | hash slab k. Each waits for the one
    # before it, so no more than two slabs are alive at any time.
    with ThreadPoolExecutor(1, thread_name_prefix="emdata-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="emdata-digest") as hasher, \
            Progress(shape[0], desc, unit="slice") as progress:
        next_slab: Future = reader.submit(read, starts[0]) if starts else None
        pending: Future | None = None
        for i, z0 in enumerate(starts):
            slab = next_slab.result()
            if pending is not None:
                pending.result()  # slab k-1 is hashed and released
            pending = hasher.submit(digest.update, z0, slab)
            if i + 1 < len(starts):
                next_slab = reader.submit(read, starts[i + 1])
            dset[z0:z0 + slab.shape[0]] = slab
            progress.update(slab.shape[0])
            del slab
        if pending is not None:
            pending.result()
    array_sha256 = digest.sha.hexdigest()
    statistics = digest.stats.result()
    dset.attrs.update(attrs)
    dset.attrs["array_sha256"] = array_sha256
    dset.attrs["statistics"] = json.dumps(statistics, sort_keys=True)
    return {"array_sha256": array_sha256, "statistics": statistics, "foreground": digest.foreground}


def _root_attrs(cfg: Config, key: str, source_record: dict[str, Any]) -> dict[str, Any]:
    ds = cfg.dataset(key)
    files = source_record.get("files", {})
    return {
        "emdata_version": __version__,
        "format_version": hdf5.FORMAT_VERSION,
        "dataset": key,
        "title": ds.title,
        "license": ds.license,
        "citation": ds.citation,
        "accession": ds.accession or "",
        "doi": ds.doi or "",
        "modality": ds.modality,
        "source_kind": ds.source_kind,
        "source_urls": json.dumps([f["url"] for f in files.values()]),
        "source_checksums": json.dumps({f["url"]: f.get("sha256") for f in files.values()}, sort_keys=True),
        "params": json.dumps({"dataset": json_safe(ds.raw_params), "normalize": cfg.normalize.to_dict()},
                             sort_keys=True),
    }


def read_source_record(cfg: Config, key: str) -> dict[str, Any]:
    """The fetch record of ``data/raw/<key>``; it must match the source in params.yaml."""
    path = cfg.raw_dir(key) / SOURCE_RECORD
    if not path.is_file():
        raise NotBuiltError(f"{key}: not fetched yet ({path} is missing); run `emdata fetch {key}` "
                            f"or `dvc pull data/raw/{key}`")
    record = json.loads(path.read_text())
    if record.get("spec") != cfg.dataset(key).source.to_dict():
        raise NotBuiltError(f"{key}: {cfg.raw_dir(key)} was fetched with other source params than params.yaml "
                            f"has now; run `emdata fetch {key}` (or `dvc repro fetch@{key}`)")
    return record


def normalize_dataset(cfg: Config, key: str) -> Path:
    """Write ``data/processed/<key>.h5`` from ``data/raw/<key>``; return its path."""
    import h5py

    ds = cfg.dataset(key)
    source = get_source(ds.source_kind)
    source_record = read_source_record(cfg, key)
    raw = cfg.raw_dir(key)
    out = cfg.processed_path(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    params = cfg.normalize
    spatial = hdf5.spatial_attrs(ds.voxel_size_nm, ds.offset_nm)
    try:
        with ExitStack() as stack:
            volume = stack.enter_context(source.open_volume(ds.source, raw, key))
            labels = {n: stack.enter_context(v) for n, v in source.open_labels(ds.source, raw, key).items()}
            for name, lab in labels.items():
                if tuple(lab.shape) != tuple(volume.shape):
                    raise FormatError(key, f"labels/{name}", f"shape {lab.shape} differs from the image {volume.shape}",
                                      "check the label file named in params.yaml")
            native = json_safe(source.read_metadata(ds.source, raw, key))
            with h5py.File(tmp, "w") as f:
                f.attrs.update(_root_attrs(cfg, key, source_record))
                prov = f.create_group("provenance")
                prov.create_dataset("source_record", data=json.dumps(source_record, sort_keys=True))
                prov.create_dataset("native_metadata", data=json.dumps(native, sort_keys=True))
                common = dict(chunks=params.chunks, compression=params.compression, level=params.compression_level,
                              attrs=spatial)
                write_volume(f, hdf5.RAW, volume, label=False, desc=f"{key}: raw", **common)
                for name, lab in labels.items():
                    result = write_volume(f, f"{hdf5.LABELS}/{name}", lab, label=True,
                                          desc=f"{key}: labels/{name}", **common)
                    f.create_dataset(f"{hdf5.LABEL_STATS}/{name}/chunk_foreground", data=result["foreground"])
        _check_written(tmp, key, tuple(volume.shape), list(labels))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("%s: wrote %s", key, out)
    return out


def _check_written(path: Path, key: str, shape: tuple[int, ...], labels: list[str]) -> None:
    """Reopen the temporary file: the layout must be complete before it gets the final name."""
    with hdf5.open_read(path) as f:
        names = [hdf5.RAW] + [f"{hdf5.LABELS}/{n}" for n in labels]
        for name in names:
            dset = f.get(name)
            if dset is None or dset.shape != shape or "array_sha256" not in dset.attrs:
                raise FormatError(key, str(path), f"{name} was not written completely", "run normalize again")
        last = tuple(max(0, s - 1) for s in shape)
        f[hdf5.RAW][last]  # the last chunk decodes
