"""Raw source volume -> canonical HDF5, in chunk-aligned tiles, under a memory budget.

Tiles come from :mod:`emdata.core.boxes`. Three things overlap on the two cores: a reader thread
reads tile k+1, the main thread writes tile k, a digest thread hashes tile k and adds it to
the exact statistics. File reads, HDF5 writes, sha256 and the histogram kernel all release the
GIL. At most ``tiles.IN_FLIGHT`` tiles are alive, so memory is bounded by the budget in params
(``normalize.memory_budget_mb``), whatever the XY size. Output is little-endian whatever the
source's byte order, and the statistics and ``array_sha256`` are computed on the values. The
file is written under a temporary name, checked, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from emdata import __version__
from emdata.params.config import Config
from emdata.errors import ConfigError, FormatError, OutputError
from emdata.sources.fetch.record import FetchedFile, FetchRecord, HashState, require_fetched
from emdata.core.geometry import Geometry, resolve, same_geometry
from emdata.h5 import hdf5
from emdata.core.atomic import temporary_path
from emdata.core.lock import dataset_lock
from emdata.core.progress import Progress
from emdata.formats.raw import MappedVolume, RawVolume, json_safe
from emdata.sources import get_source, layout_of
from emdata.core.stats import StreamingStats
from emdata.core.boxes import Box, plan_tiles
from emdata.stages.workspace import refuse_dataset_links, remove_stale_temporaries

log = logging.getLogger(__name__)
DEFAULT_BUDGET = 256 << 20


def output_dtype(dtype: np.dtype) -> np.dtype:
    """The stored dtype: the same values, little-endian (bool and single bytes as they are)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("<") if dtype.byteorder in (">", "=", "<") and dtype.itemsize > 1 else dtype


class _Digest:
    """sha256 of the voxels in C order, little-endian; exact statistics; label foreground."""

    def __init__(self, dtype: np.dtype, chunks: tuple[int, ...], shape: tuple[int, ...], label: bool) -> None:
        self.sha = hashlib.sha256()
        self.stats = StreamingStats(dtype)
        self.chunks = chunks
        grid = tuple(-(-s // c) for s, c in zip(shape, chunks))
        self.foreground = np.zeros(grid, np.int64) if label else None

    def hash(self, data: np.ndarray) -> None:
        """Voxels in C order: every call must continue where the previous box ended."""
        self.sha.update(hdf5.voxel_bytes(data))

    def tally(self, data: np.ndarray) -> None:
        """Exact statistics: order-free, so they come from the write pass, on the reader thread."""
        self.stats.update(data)

    def count(self, start: tuple[int, ...], data: np.ndarray) -> None:
        """Nonzero voxels per chunk of a chunk-aligned tile."""
        if self.foreground is None:
            return
        counts = _chunk_counts(data != 0, self.chunks)
        k = [a // c for a, c in zip(start, self.chunks)]
        self.foreground[k[0]:k[0] + counts.shape[0], k[1]:k[1] + counts.shape[1], k[2]:k[2] + counts.shape[2]] += counts


def _chunk_counts(mask: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    """Number of True voxels per chunk of a chunk-aligned box."""
    grid = [-(-n // c) for n, c in zip(mask.shape, chunks)]
    padded = np.zeros([g * c for g, c in zip(grid, chunks)], bool)
    padded[: mask.shape[0], : mask.shape[1], : mask.shape[2]] = mask
    cz, cy, cx = chunks
    return padded.reshape(grid[0], cz, grid[1], cy, grid[2], cx).sum(axis=(1, 3, 5))


def _pipeline(boxes: list[Box], read: Callable[[Box], np.ndarray], consume: Callable[[Box, np.ndarray], None],
              digest: Callable[[Box, np.ndarray], None], progress: Progress) -> None:
    """read box k+1 | consume box k (main thread) | digest box k, each waiting for the one before."""
    if not boxes:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="emdata-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="emdata-digest") as hasher:
        next_data: Future = reader.submit(read, boxes[0])
        pending: Future | None = None
        for i, box in enumerate(boxes):
            data = next_data.result()
            if i + 1 < len(boxes):
                next_data = reader.submit(read, boxes[i + 1])
            if pending is not None:
                pending.result()  # box k-1 is digested and released
            pending = hasher.submit(digest, box, data)
            consume(box, data)
            progress.update(int(np.prod([b - a for a, b in zip(*box)])))
            del data
        pending.result()


def create_array(group: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...],
                 compression: str, level: int) -> Any:
    """The empty chunked dataset ``name`` (both normalize paths create arrays here)."""
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=hdf5.chunk_shape(chunks, shape), fillvalue=0,
                                **hdf5.compression_options(compression, level))


def finish_array(dset: Any, attrs: dict[str, Any], array_sha256: str, statistics: dict[str, Any]) -> None:
    """Flush the placed chunks, then set the attributes (in this order, in both normalize paths)."""
    dset.flush()  # write failures surface here, not in a __dealloc__ that cannot raise
    dset.attrs.update(attrs)
    dset.attrs["array_sha256"] = array_sha256
    dset.attrs["statistics"] = json.dumps(statistics, sort_keys=True)


def read_tile(volume: RawVolume, box: Box, dtype: np.dtype, desc: str) -> np.ndarray:
    """A box of the source in the output dtype; a reader returning the wrong shape is a FormatError."""
    start, stop = box
    data = volume.read_between(start, stop)
    want = tuple(b - a for a, b in zip(start, stop))
    if data.shape != want:
        raise FormatError(getattr(volume, "dataset", "?"), desc, f"read {data.shape} for the box {start}..{stop}, "
                          f"expected {want}", "the source reader returned the wrong shape; please report it")
    return data.astype(dtype, copy=False)


def hash_boxes(plan: Any) -> list[Box]:
    """The boxes whose voxels, in this order, are the volume in C order (the sha256's input)."""
    return plan.tiles if plan.one_pass else (plan.hash_boxes or [])


def write_volume(group: Any, name: str, volume: RawVolume, *, chunks: tuple[int, int, int], compression: str,
                 level: int, attrs: dict[str, Any], label: bool, desc: str,
                 budget: int = DEFAULT_BUDGET, plane: bool = False,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Stream ``volume`` into dataset ``name``; return its sha256, statistics and chunk counts.

    Each tile is encoded chunk by chunk and placed with direct chunk writes in C order of the
    chunk grid (:mod:`emdata.h5.chunks`), exactly as the distributed path places the chunks its
    workers encode, so both give the same bytes. ``plane``: the volume is one Z plane, stored as
    a 2D (Y, X) dataset (collections of 2D images). ``progress``: count into a caller's progress
    (one for many small arrays).
    """
    from emdata.h5.chunks import encode_tile, place

    shape = tuple(int(n) for n in volume.shape)
    dtype = output_dtype(volume.dtype)
    if plane and shape[0] != 1:
        raise FormatError(getattr(volume, "dataset", "?"), desc, f"a 2D image was expected, got shape {shape}",
                          "please report it (a source bug)")
    if plane:
        dset = create_array(group, name, shape[1:], dtype, chunks[1:], compression, level)
        chunk = (1, *dset.chunks)
    else:
        dset = create_array(group, name, shape, dtype, chunks, compression, level)
        chunk = tuple(dset.chunks)
    digest = _Digest(dtype, chunk, shape, label)
    plan = plan_tiles(shape, chunk, dtype.itemsize, budget)

    def read(box: Box) -> np.ndarray:
        return read_tile(volume, box, dtype, desc)

    def read_and_tally(box: Box) -> np.ndarray:
        # The histogram runs here so that the three threads carry similar loads: read + histogram |
        # encode + HDF5 write | sha256 (+ label counts).
        data = read(box)
        digest.tally(data)
        return data

    def write(box: Box, data: np.ndarray) -> None:
        if plane:
            place(dset, encode_tile(data[0], box[0][1:], chunk[1:], compression, level))
        else:
            place(dset, encode_tile(data, box[0], chunk, compression, level))

    def hash_and_count(box: Box, data: np.ndarray) -> None:
        if plan.one_pass:
            digest.hash(data)
        digest.count(box[0], data)

    voxels = int(np.prod(shape))
    with ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(Progress(voxels * (1 if plan.one_pass else 2), desc, unit="vox"))
        _pipeline(plan.tiles, read_and_tally, write, hash_and_count, progress)
        if not plan.one_pass:  # the sha256 needs C order: a second, read-only pass in hash boxes
            _pipeline(hash_boxes(plan), read, lambda box, data: None, lambda box, data: digest.hash(data),
                      progress)
    array_sha256 = digest.sha.hexdigest()
    statistics = digest.stats.result()
    finish_array(dset, attrs, array_sha256, statistics)
    return {"array_sha256": array_sha256, "statistics": statistics, "foreground": digest.foreground,
            "tiles": len(plan.tiles), "one_pass": plan.one_pass}


MAX_SOURCE_ENTRIES = 64  # root attributes live in the object header (64 KiB in all): keep the lists bounded


def source_entries(files: dict[str, FetchedFile]) -> dict[str, str | None]:
    """URL -> sha256 for the root attributes ``source_urls``/``source_checksums``, at most 64 entries.

    One entry per distinct URL, in the order of the files' relative paths: the file's sha256, or,
    when one URL stands for several local files (a decoded chunk store), the sha256 of their
    manifest (a ``relpath size sha256`` line per file, sorted). Beyond 64 URLs (a copy of
    thousands of objects), URLs are folded into their parent folders until they fit. The full
    per-file list is always in ``/provenance/source_record``.
    """
    groups: dict[str, list[tuple[str, FetchedFile]]] = {}
    for rel, f in sorted(files.items()):
        groups.setdefault(f.url, []).append((rel, f))
    while len(groups) > MAX_SOURCE_ENTRIES:
        folded: dict[str, list[tuple[str, FetchedFile]]] = {}
        for url, items in groups.items():
            folded.setdefault(_parent_url(url), []).extend(items)
        if len(folded) == len(groups):
            break
        groups = folded
    return {url: items[0][1].sha256 if len(items) == 1 else _manifest_sha256(items) for url, items in groups.items()}


def _parent_url(url: str) -> str:
    """``https://h/a/b/c`` -> ``https://h/a/b/``; a host's root stays itself."""
    head, sep, path = url.partition("://")
    host, slash, rest = path.partition("/")
    parts = rest.rstrip("/").split("/")
    if not sep or not slash or parts == [""]:
        return url
    return f"{head}://{host}/" + "".join(p + "/" for p in parts[:-1])


def _manifest_sha256(items: list[tuple[str, FetchedFile]]) -> str:
    lines = sorted(f"{rel} {f.size} {f.sha256}\n" for rel, f in items)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _root_attrs(cfg: Config, key: str, record: FetchRecord, geometry: Geometry,
                description: dict[str, Any]) -> dict[str, Any]:
    ds = cfg.dataset(key)
    entries = source_entries(record.files)
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
        "source_urls": json.dumps(list(entries)),
        "source_checksums": json.dumps(entries, sort_keys=True),
        "params": json.dumps({"dataset": json_safe(ds.raw_params), "normalize": cfg.normalize.to_dict()},
                             sort_keys=True),
        "geometry_origin": json.dumps(geometry.origin, sort_keys=True),
        "description": json.dumps(description, sort_keys=True),
    }


def dataset_geometry(cfg: Config, key: str, volume: RawVolume) -> Geometry:
    """The voxel size and offset the HDF5 records: the source's, overridden by params.yaml."""
    ds = cfg.dataset(key)
    return resolve(key, params_voxel=ds.voxel_size_nm, params_offset=ds.offset_nm,
                   source_voxel=volume.voxel_size_nm, source_offset=volume.offset_nm, trust=ds.geometry_trust)


def _check_labels(key: str, volume: RawVolume, labels: dict[str, RawVolume], params_voxel: Any = None) -> None:
    for name, lab in labels.items():
        if tuple(lab.shape) != tuple(volume.shape):
            where = getattr(lab, "path", f"labels/{name}")
            raise FormatError(key, str(where), f"label {name!r} has shape {tuple(lab.shape)} but the image has "
                              f"{tuple(volume.shape)}", "check that both files are complete and belong together")
        # Offsets are compared in voxels; with no voxel size anywhere, geometry.resolve refuses anyway.
        voxel = volume.voxel_size_nm or lab.voxel_size_nm or params_voxel
        for attr, scale in (("voxel_size_nm", None), ("offset_nm", voxel)):
            mine, theirs = getattr(lab, attr), getattr(volume, attr)
            if attr == "offset_nm" and scale is None:
                continue
            if mine is not None and theirs is not None and not same_geometry(mine, theirs, scale):
                raise FormatError(key, f"labels/{name}", f"{attr} {mine} differs from the image's {theirs}",
                                  "labels must lie on the image's grid")


def _warm_kernels() -> None:
    """Load the compiled histogram kernel while the files are opened (it costs ~0.5 s per process)."""
    try:
        from emdata.core.kernels import add_histogram

        for codes, bins in ((np.zeros(8, np.uint8), 256), (np.zeros(8, np.uint16), 65536)):
            add_histogram(codes, np.zeros(bins, np.int64))
    except Exception:  # noqa: BLE001 - a failure shows again, with its cause, where the kernel is used
        log.debug("preloading the histogram kernel failed", exc_info=True)


def _map_label_values(key: str, labels: dict[str, RawVolume],
                      values: dict[str, dict[int, int]]) -> dict[str, RawVolume]:
    """Labels with the value mappings of params (``label_values``) applied as they are read."""
    unknown = sorted(set(values) - set(labels))
    if unknown:
        raise ConfigError(f"params.yaml: datasets.{key}.label_values.{unknown[0]}: no such label "
                          f"(labels: {', '.join(sorted(labels)) or 'none'})")
    return {name: MappedVolume(lab, values[name]) if name in values else lab for name, lab in labels.items()}


def normalize_dataset(cfg: Config, key: str, *, scheduler: str | None = None) -> Path:
    """Write ``data/processed/<key>.h5`` from ``data/raw/<key>``; return its path.

    With ``scheduler`` (a Dask distributed scheduler address) the tiles are read and encoded by
    the cluster's workers and this process places them (:mod:`emdata.stages.normalize.distributed`);
    the file is byte-identical either way.
    """
    ds = cfg.dataset(key)
    source = get_source(ds.source_kind)
    raw = cfg.raw_dir(key)
    refuse_dataset_links(cfg, key, "normalize")  # as fetch does, before the lock file or any folder is created
    out = cfg.processed_path(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The lock first: fetch takes the same lock, so the record read below describes the very
    # files normalize reads (checked before the lock, a fetch finishing in between would give an
    # HDF5 whose provenance names other raw files than its voxels came from).
    with dataset_lock(cfg.lock_dir(), key, "normalize"):
        # sha256 of raw files changed since they were verified (an in-place edit, a checkout): no
        # HDF5 is built from bytes that are not the fetched ones.
        record = require_fetched(raw, key, ds.source.to_dict(), state=HashState(cfg.hash_state_path(key)))
        remove_stale_temporaries(cfg, key)  # killed runs' temporaries (the lock says no other run is writing)
        if layout_of(source) == "collection":  # many images with a table: its own writer
            if scheduler:
                raise ConfigError(f"{key}: --scheduler is for single volumes; collections normalize in one process")
            from emdata.stages.normalize.collection import normalize_collection

            return normalize_collection(cfg, key, source, raw, record, out)
        return _normalize_locked(cfg, key, source, raw, record, out, scheduler=scheduler)


def _check_free_space(key: str, out: Path, arrays: list[RawVolume], compression: str) -> None:
    """Refuse to start when the disk cannot hold the output (HDF5 fails badly when a write hits ENOSPC)."""
    voxels = sum(int(np.prod(a.shape)) * output_dtype(a.dtype).itemsize for a in arrays)
    need = voxels // (2 if compression != "none" else 1) + (4 << 20)  # compressed: assume at most half saved
    free = shutil.disk_usage(out.parent).free
    old = out.stat().st_size if out.is_file() else 0  # replaced only after the new file is complete
    if free < need:
        raise OutputError(key, str(out.parent), f"not enough free disk space: {free / 2**20:.0f} MiB free, "
                          f"the output needs about {need / 2**20:.0f} MiB (the old output, {old / 2**20:.0f} MiB, "
                          "stays until the new one is complete)", "free some space and run normalize again")


def open_arrays(stack: ExitStack, cfg: Config, key: str, source: Any, raw: Path) -> tuple[RawVolume, dict[str, RawVolume]]:
    """The source's image and labels (label value maps applied), checked to lie on one grid."""
    ds = cfg.dataset(key)
    volume = stack.enter_context(source.open_volume(ds.source, raw, key))
    open_labels = getattr(source, "open_labels", None)
    labels = {n: stack.enter_context(v) for n, v in (open_labels(ds.source, raw, key) if open_labels else {}).items()}
    _check_labels(key, volume, labels, ds.voxel_size_nm)
    return volume, _map_label_values(key, labels, ds.label_values)


def _normalize_locked(cfg: Config, key: str, source: Any, raw: Path, record: FetchRecord, out: Path, *,
                      scheduler: str | None = None) -> Path:
    ds = cfg.dataset(key)
    tmp = temporary_path(out)
    warm = threading.Thread(target=_warm_kernels, name="emdata-warm", daemon=True)
    params = cfg.normalize
    try:
        with ExitStack() as stack:
            volume, labels = open_arrays(stack, cfg, key, source, raw)
            write: Callable[..., dict[str, Any]] = write_volume
            if scheduler:  # the cluster reads and encodes; this process places the chunks
                from emdata.stages.normalize.distributed import DistributedWriter

                arrays = {hdf5.RAW: volume, **{f"{hdf5.LABELS}/{n}": lab for n, lab in labels.items()}}
                write = stack.enter_context(DistributedWriter(scheduler, cfg, key, record, arrays))
            elif int(np.prod(volume.shape)) > 1 << 16:  # small volumes count with np.bincount instead
                warm.start()
            _check_free_space(key, out, [volume, *labels.values()], params.compression)
            geometry = dataset_geometry(cfg, key, volume)
            native = json_safe(source.read_metadata(ds.source, raw, key))
            describe = getattr(source, "describe", None)
            description = json_safe(describe(ds.source, raw, key)) if describe else {}
            with hdf5.create(tmp, key) as f:
                f.attrs.update(_root_attrs(cfg, key, record, geometry, description))
                prov = f.create_group("provenance")
                prov.create_dataset("source_record", data=json.dumps(record.to_dict(), sort_keys=True))
                prov.create_dataset("native_metadata", data=json.dumps(native, sort_keys=True))
                common = dict(chunks=params.chunks, compression=params.compression, level=params.compression_level,
                              attrs=hdf5.spatial_attrs(geometry.voxel_size_nm, geometry.offset_nm),
                              budget=params.memory_budget)
                write(f, hdf5.RAW, volume, label=False, desc=f"{key}: raw", **common)
                for name, lab in labels.items():
                    mapping = ds.label_values.get(name)
                    attrs = {**common["attrs"], **({"value_map": json.dumps({str(k): v for k, v in mapping.items()})}
                                                   if mapping else {})}
                    result = write(f, f"{hdf5.LABELS}/{name}", lab, label=True,
                                          desc=f"{key}: labels/{name}", **{**common, "attrs": attrs})
                    f.create_dataset(f"{hdf5.LABEL_STATS}/{name}/chunk_foreground", data=result["foreground"])
        _check_written(tmp, key, tuple(volume.shape), list(labels))
        _publish(cfg, key, tmp, out)
        from emdata.stages.normalize.distributed import discard_ledger

        # Tiles staged by a distributed run are kept until the output is published.
        discard_ledger(cfg, key, keep_log=bool(scheduler))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if warm.is_alive():
            warm.join()
    log.info("%s: wrote %s and %s", key, out, cfg.record_path(key))
    return out


def _publish(cfg: Config, key: str, tmp: Path, out: Path) -> None:
    """Give the HDF5, its chunk index and its record their names together, or leave the dataset
    "not normalized".

    The record and the chunk index (:mod:`emdata.h5.chunk_index`) are built from the checked
    temporary file first; the old record goes before the new HDF5 takes its name and the record
    comes last, so an interruption leaves an HDF5 without a record (which ``list`` and ``verify``
    report as not normalized), never a new HDF5 beside an old record or an old index.
    """
    from emdata.h5 import chunk_index
    from emdata.core.atomic import json_bytes, write_error, write_new
    from emdata.h5.metadata import build_record

    record = build_record(cfg, key, tmp)
    record_path = cfg.record_path(key)
    index_path = chunk_index.index_path_for(record_path)
    staged, staged_index = temporary_path(record_path), temporary_path(index_path)
    try:
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, record_path, key) from exc
        write_new(staged, json_bytes(record), dataset=key, final=record_path)
        write_new(staged_index, chunk_index.build(tmp, file_name=out.name, file_sha256=record["file_sha256"]),
                  dataset=key, final=index_path)
        record_path.unlink(missing_ok=True)
        os.replace(tmp, out)
        os.replace(staged_index, index_path)
        os.replace(staged, record_path)
    finally:
        staged.unlink(missing_ok=True)
        staged_index.unlink(missing_ok=True)


def _check_written(path: Path, key: str, shape: tuple[int, ...], labels: Iterable[str]) -> None:
    """Reopen the temporary file: the layout must be complete before it gets the final name."""
    with hdf5.open_read(path) as f:
        names = [hdf5.RAW] + [f"{hdf5.LABELS}/{n}" for n in labels]
        for name in names:
            dset = f.get(name)
            if dset is None or dset.shape != shape or "array_sha256" not in dset.attrs:
                raise FormatError(key, str(path), f"{name} was not written completely", "run normalize again")
        last = tuple(max(0, s - 1) for s in shape)
        f[hdf5.RAW][last]  # the last chunk decodes
