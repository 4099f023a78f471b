"""``emdata normalize``: raw source volume -> canonical HDF5, or a collection's images -> one HDF5.

:func:`normalize_dataset` is the entry point of the stage: under the dataset's lock it checks the
fetched files against their record, then writes a volume here (each array streamed through
:mod:`emdata.stages.normalize.write`, or placed from a Dask cluster by
:mod:`emdata.stages.normalize.distributed`) or hands a collection to
:mod:`emdata.stages.normalize.collection`. The file is written under a temporary name, checked,
then published with its record and chunk index (:mod:`emdata.stages.normalize.publish`).
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from emdata.core.geometry import Geometry, resolve
from emdata.core.lock import dataset_lock
from emdata.errors import ConfigError, FormatError
from emdata.formats.raw import RawVolume
from emdata.h5 import hdf5
from emdata.params.config import Config
from emdata.sources.fetch.record import FetchRecord, HashState, require_fetched
from emdata.stages.normalize.arrays import open_arrays
from emdata.stages.normalize.collection import normalize_collection
from emdata.stages.normalize.distributed import DistributedWriter
from emdata.stages.normalize.ledger import discard_ledger
from emdata.stages.normalize.header import root_attrs, source_metadata, write_header
from emdata.stages.normalize.publish import publish, staged
from emdata.stages.normalize.write import KernelWarmer, check_free_space, write_volume
from emdata.stages.workspace import refuse_dataset_links, remove_stale_temporaries
from emdata.sources.dataset import Dataset, resolve_dataset

log = logging.getLogger(__name__)


def dataset_geometry(ds: Dataset, volume: RawVolume) -> Geometry:
    """The voxel size and offset the HDF5 records: the source's, overridden by params.yaml."""
    return resolve(ds.key, params_voxel=ds.voxel_size_nm, params_offset=ds.offset_nm,
                   source_voxel=volume.voxel_size_nm, source_offset=volume.offset_nm, trust=ds.geometry_trust,
                   source_names=ds.geometry_candidates)


def normalize_dataset(cfg: Config, key: str, *, scheduler: str | None = None) -> Path:
    """Write ``data/processed/<key>.h5`` from ``data/raw/<key>``; return its path.

    With ``scheduler`` (a Dask distributed scheduler address) the tiles are read and encoded by
    the cluster's workers and this process places them (:mod:`emdata.stages.normalize.distributed`);
    the file is byte-identical either way.
    """
    ds = resolve_dataset(cfg, key)  # once: everything below takes the resolved dataset
    raw = ds.paths.raw
    refuse_dataset_links(ds.paths, "normalize")  # as fetch does, before the lock file or any folder is created
    out = cfg.processed_path(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The lock first: fetch takes the same lock, so the record read below describes the very
    # files normalize reads (checked before the lock, a fetch finishing in between would give an
    # HDF5 whose provenance names other raw files than its voxels came from).
    with dataset_lock(cfg.lock_dir(), key, "normalize"):
        # sha256 of raw files changed since they were verified (an in-place edit, a checkout): no
        # HDF5 is built from bytes that are not the fetched ones.
        record = require_fetched(raw, key, ds.source.to_dict(), state=HashState(cfg.hash_state_path(key)))
        remove_stale_temporaries(ds.paths)  # killed runs' temporaries (the lock says no other run is writing)
        if ds.layout == "collection":  # many images with a table: its own writer
            if scheduler:
                raise ConfigError(f"{key}: --scheduler is for single volumes; collections normalize in one process")
            return normalize_collection(cfg, ds, record, out)
        return _normalize_locked(cfg, ds, record, out, scheduler=scheduler)


def _normalize_locked(cfg: Config, ds: Dataset, record: FetchRecord, out: Path, *,
                      scheduler: str | None = None) -> Path:
    key = ds.key
    params = cfg.normalize
    with staged(out) as tmp, KernelWarmer() as warm:
        with ExitStack() as stack:
            volume, labels = open_arrays(stack, ds)
            write: Callable[..., dict[str, Any]] = write_volume
            if scheduler:  # the cluster reads and encodes; this process places the chunks
                arrays = {hdf5.RAW: volume, **{f"{hdf5.LABELS}/{n}": lab for n, lab in labels.items()}}
                write = stack.enter_context(DistributedWriter(scheduler, cfg, ds, record, arrays))
            elif int(np.prod(volume.shape)) > 1 << 16:  # small volumes count with np.bincount instead
                warm.start()
            check_free_space(key, out, [volume, *labels.values()], params.compression)
            geometry = dataset_geometry(ds, volume)
            native, description = source_metadata(ds)
            with hdf5.create(tmp, key) as f:
                write_header(f, root_attrs(cfg, ds, record, geometry, description), record, native)
                common: dict[str, Any] = dict(chunks=params.chunks, compression=params.compression, level=params.compression_level,
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
        publish(cfg, key, tmp, out)
        # Tiles staged by a distributed run are kept until the output is published.
        discard_ledger(cfg, key, keep_log=bool(scheduler))
    log.info("%s: wrote %s and %s", key, out, cfg.record_path(key))
    return out


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
