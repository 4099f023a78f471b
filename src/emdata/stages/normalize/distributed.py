"""normalize on a Dask distributed cluster: workers read and encode tiles, this process places them.

``emdata normalize DS --scheduler ADDRESS`` (or ``EMDATA_SCHEDULER=ADDRESS``; never a param,
so moving to a cluster does not invalidate a DVC stage) gives the same file, byte for byte, as
a single-process normalize:

- The tiles are the single-process tiles (:func:`emdata.core.boxes.plan_tiles`, same budget). A
  worker opens the dataset's source itself (the project folder must be visible to the workers
  at the same path, e.g. a shared file system), reads one tile, encodes its chunks through the
  same HDF5 filters (:func:`emdata.h5.chunks.encode_tile`), and returns them with the tile's
  partial statistics (histogram or moments) and label chunk counts.
- This process is the one HDF5 writer. It stages every returned tile in a ledger folder
  (:mod:`emdata.stages.normalize.ledger`: ``data/.state/<ds>.normalize/``, ``blocks/`` plus
  ``ledger.jsonl``, one line per finished tile), and places the tiles in plan order with direct chunk writes, merging the statistics in
  that order, exactly as :func:`emdata.stages.normalize.write.write_volume` does. HDF5 calls happen in the
  same sequence, so the files are identical.
- ``array_sha256`` is a sha256 of the voxels in C order, which cannot be split across
  machines; this process computes it by reading the source in the single-process hash boxes,
  beside the placement (a read and a sha256 at about 1-2 GB/s: the serial part of the job).
- A worker that dies costs only its tiles: Dask runs them again elsewhere. If this process
  dies, a rerun with the same inputs, settings and code (the ledger's fingerprint) submits only
  the tiles the ledger lacks, then places all of them again from the staged copies. A published
  output removes the staged tiles and keeps the ledger's lines as
  ``data/.state/<ds>.normalize-ledger.jsonl`` (which worker encoded which tile, in which run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from emdata.core.boxes import Box, plan_tiles
from emdata.core.progress import Progress
from emdata.core.stats import statistics_for
from emdata.errors import ClusterError, EmdataError
from emdata.formats.raw import RawVolume, json_safe
from emdata.h5 import hdf5
from emdata.h5.chunks import EncodedChunk, encode_tile, place
from emdata.params.config import load_config
from emdata.stages.codedeps import fingerprint as code_fingerprint
from emdata.stages.normalize.arrays import open_arrays
from emdata.stages.normalize.ledger import Ledger, ledger_dir, slug
from emdata.stages.normalize.write import chunk_counts, create_array, finish_array, hash_boxes, output_dtype, read_tile
from emdata.sources.dataset import Dataset, resolve_dataset

log = logging.getLogger(__name__)
SCHEDULER_ENV = "EMDATA_SCHEDULER"
TIMEOUT_ENV = "EMDATA_SCHEDULER_TIMEOUT"  # seconds to wait for the scheduler (default 20)


# -- the worker side ----------------------------------------------------------------------------

_OPEN: dict[tuple, tuple[ExitStack, dict[str, RawVolume]]] = {}
_OPEN_LOCK = threading.Lock()


def _worker_arrays(root: str, key: str, fingerprint: str) -> dict[str, RawVolume]:
    """The dataset's arrays, opened once per worker thread and fingerprint."""
    ident = (root, key, fingerprint, threading.get_ident())
    with _OPEN_LOCK:
        hit = _OPEN.get(ident)
    if hit is not None:
        return hit[1]
    ds = resolve_dataset(load_config(Path(root)), key)  # another process: it resolves for itself
    stack = ExitStack()
    volume, labels = open_arrays(stack, ds)
    arrays = {hdf5.RAW: volume, **{f"{hdf5.LABELS}/{n}": lab for n, lab in labels.items()}}
    with _OPEN_LOCK:
        for other in [k for k in _OPEN if k[3] == ident[3] and k != ident]:  # an older run's handles
            _OPEN.pop(other)[0].close()
        _OPEN[ident] = (stack, arrays)
    return arrays


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def encode_block(root: str, key: str, fingerprint: str, array: str, box: Box, chunks: tuple[int, ...],
                 compression: str, level: int, label: bool) -> dict[str, Any]:
    """On a worker: read one tile of ``array`` and return its encoded chunks and partial statistics."""
    started = time.perf_counter()
    volume = _worker_arrays(root, key, fingerprint)[array]
    dtype = output_dtype(volume.dtype)
    data = read_tile(volume, box, dtype, f"{key}: {array}")
    stats = statistics_for(dtype, label=label).partial(data)
    foreground = chunk_counts(data != 0, chunks) if label else None
    encoded = encode_tile(data, box[0], chunks, compression, level)
    return {"chunks": [(c.offset, c.filter_mask, bytes(c.data)) for c in encoded], "stats": stats,
            "foreground": foreground, "worker": _worker_name(), "seconds": time.perf_counter() - started}


# -- the client side: one writer ----------------------------------------------------------------


def fingerprint(cfg: Any, ds: Dataset, record: Any, arrays: dict[str, RawVolume]) -> str:
    """What the staged tiles depend on: inputs, every byte-deciding setting, the tiling and the code."""
    return json.dumps({
        "dataset": ds.key, "source_record": record.to_dict(), "params": json_safe(ds.raw_params),
        "normalize": cfg.normalize.to_dict(), "budget": cfg.normalize.memory_budget,
        "arrays": {n: [list(map(int, v.shape)), output_dtype(v.dtype).str] for n, v in arrays.items()},
        "code": code_fingerprint(ds.source_kind, "normalize")["modules"],
    }, sort_keys=True)


def _connect(client_class: Any, address: str, timeout: float) -> Any:
    """A connected ``distributed.Client``; one that fails half-way is closed here.

    A Client whose constructor raises (an address it cannot parse, a scheduler it cannot reach)
    has already started its event loop; left to the garbage collector, its ``__del__`` waits up to
    twice the timeout and prints an "Exception ignored" traceback at exit. So the object is made
    first and its ``__init__`` called apart, to keep hold of it and close it on failure.
    """
    client = client_class.__new__(client_class)
    try:
        client.__init__(address, timeout=timeout, set_as_default=False)
    except BaseException:
        try:
            client.close(timeout=min(timeout, 5))
        except Exception:  # noqa: BLE001 - the first error is the one to report
            log.debug("closing the half-built Dask client failed", exc_info=True)
        raise
    return client


class DistributedWriter:
    """The ``write_volume`` of normalize when a scheduler is given (see the module docstring).

    Used as a context manager around the HDF5 writing: entering connects to the scheduler and
    submits every tile the ledger lacks (raw first, then labels, at most ``window`` at a time);
    calling it places one array. normalize drops the ledger once the output is published.
    """

    def __init__(self, scheduler: str, cfg: Any, ds: Dataset, record: Any, arrays: dict[str, RawVolume]) -> None:
        self.address = scheduler
        self.cfg, self.key = cfg, ds.key
        self.arrays = arrays
        params = cfg.normalize
        self.compression, self.level = params.compression, params.compression_level
        self.plans = {}
        for name, vol in arrays.items():
            shape = tuple(int(n) for n in vol.shape)
            dtype = output_dtype(vol.dtype)
            chunk = hdf5.chunk_shape(params.chunks, shape)
            self.plans[name] = (chunk, plan_tiles(shape, chunk, dtype.itemsize, params.memory_budget))
        self.fingerprint = fingerprint(cfg, ds, record, arrays)
        self.ledger: Ledger | None = None
        self.client: Any = None
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._futures: dict[str, Any] = {}
        self._fresh: dict[tuple[str, int], dict[str, Any]] = {}  # staged tiles not placed yet, kept in memory
        self._collector: threading.Thread | None = None
        self.submitted = 0

    # -- lifecycle

    def __enter__(self) -> "DistributedWriter":
        try:
            from distributed import Client
        except ImportError as exc:
            raise ClusterError(f"{self.key}: normalize --scheduler needs Dask distributed: "
                               "pip install 'emdata[distributed]'") from exc
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV) or 20)
            self.client = _connect(Client, self.address, timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(f"{self.key}: cannot reach the Dask scheduler at {self.address!r} "
                               f"({type(exc).__name__}: {exc}); start it or fix --scheduler / ${SCHEDULER_ENV}") from exc
        self.ledger = Ledger(ledger_dir(self.cfg, self.key), self.fingerprint)
        tasks = [(name, i) for name, (_, plan) in self.plans.items() for i in range(len(plan.tiles))]
        todo = deque(t for t in tasks if t not in self.ledger.done)
        log.info("%s: %d of %d tiles to encode on %s (%d already in the ledger)", self.key, len(todo), len(tasks),
                 self.address, len(tasks) - len(todo))
        self._collector = threading.Thread(target=self._collect, args=(todo,), name="emdata-collect", daemon=True)
        self._collector.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        client, self.client = self.client, None
        if client is not None:
            try:
                if self._futures:
                    client.cancel(list(self._futures.values()))
            finally:
                client.close()
        if self._collector is not None:
            self._collector.join(timeout=30)
        with self._cond:
            self._cond.notify_all()

    # -- collecting results (a thread): stage each tile as it arrives

    def _submit(self, name: str, tile: int) -> Any:
        chunk, plan = self.plans[name]
        dask_key = f"emdata-normalize-{hashlib.sha1(self.fingerprint.encode()).hexdigest()[:10]}-{slug(name)}-{tile}"
        future = self.client.submit(encode_block, str(self.cfg.root), self.key, self.fingerprint, name,
                                    plan.tiles[tile], chunk, self.compression, self.level,
                                    name.startswith(hdf5.LABELS + "/"), key=dask_key, retries=2)
        self._futures[future.key] = future
        self.submitted += 1
        return future

    def _collect(self, todo: deque) -> None:
        from distributed import as_completed

        try:
            window = max(4, 2 * sum(self.client.nthreads().values()))
            owner: dict[str, tuple[str, int]] = {}
            pending = as_completed(loop=self.client.loop)
            for _ in range(min(window, len(todo))):
                name, tile = todo.popleft()
                future = self._submit(name, tile)
                owner[future.key] = (name, tile)
                pending.add(future)
            for future in pending:
                if self._stop:
                    return
                name, tile = owner.pop(future.key)
                result = future.result()
                assert self.ledger is not None
                self.ledger.stage(name, tile, result)
                with self._cond:
                    if len(self._fresh) < window:  # more waiting tiles are read back from the ledger
                        self._fresh[(name, tile)] = {
                            "stats": result["stats"], "foreground": result["foreground"],
                            "chunks": [EncodedChunk(off, mask, data) for off, mask, data in result["chunks"]]}
                self._futures.pop(future.key, None)
                future.release()
                with self._cond:
                    self._cond.notify_all()
                if todo:
                    name, tile = todo.popleft()
                    nxt = self._submit(name, tile)
                    owner[nxt.key] = (name, tile)
                    pending.add(nxt)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which raises it
            if not self._stop:
                self._error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def _wait_for(self, name: str, tile: int) -> dict[str, Any]:
        assert self.ledger is not None
        with self._cond:
            while (name, tile) not in self.ledger.done:
                if self._error is not None:
                    raise self._cluster_error(self._error)
                if self._stop or (self._collector is not None and not self._collector.is_alive()
                                  and (name, tile) not in self.ledger.done):
                    raise ClusterError(f"{self.key}: the tile collector stopped before {name} tile {tile} arrived; "
                                       "run normalize again (finished tiles are kept)")
                self._cond.wait(timeout=1.0)
            fresh = self._fresh.pop((name, tile), None)
        return fresh if fresh is not None else self.ledger.load(name, tile)

    def _cluster_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, EmdataError):
            return exc  # a source or format error raised on a worker: already one line
        return ClusterError(f"{self.key}: the cluster at {self.address} failed ({type(exc).__name__}: {exc}); "
                            f"finished tiles are kept in {ledger_dir(self.cfg, self.key)}, run normalize again to resume")

    # -- the writer: same sequence of HDF5 calls as write.write_volume

    def __call__(self, group: Any, name: str, volume: RawVolume, *, chunks: tuple[int, int, int], compression: str,
                 level: int, attrs: dict[str, Any], label: bool, desc: str, budget: int) -> dict[str, Any]:
        shape = tuple(int(n) for n in volume.shape)
        dtype = output_dtype(volume.dtype)
        dset = create_array(group, name, shape, dtype, chunks, compression, level)
        chunk, plan = self.plans[name]
        if tuple(dset.chunks) != tuple(chunk) or (compression, level) != (self.compression, self.level):
            raise ClusterError(f"{self.key}: {name}: layout differs from the submitted plan (internal error)")
        stats = statistics_for(dtype, label=label)
        grid = tuple(-(-s // c) for s, c in zip(shape, chunk))
        foreground = np.zeros(grid, np.int64) if label else None
        with ThreadPoolExecutor(1, thread_name_prefix="emdata-fingerprint") as pool:
            sha = pool.submit(self._fingerprint_pass, volume, plan, dtype, desc)
            with Progress(int(np.prod(shape)), f"{desc} (placing tiles from the cluster)", unit="vox") as progress:
                for i, box in enumerate(plan.tiles):
                    block = self._wait_for(name, i)
                    place(dset, block["chunks"])
                    stats.merge(block["stats"])
                    if foreground is not None and block["foreground"] is not None:
                        counts = block["foreground"]
                        k = [a // c for a, c in zip(box[0], chunk)]
                        foreground[k[0]:k[0] + counts.shape[0], k[1]:k[1] + counts.shape[1],
                                   k[2]:k[2] + counts.shape[2]] += counts
                    progress.update(int(np.prod([b - a for a, b in zip(*box)])))
            array_sha256 = sha.result()
        statistics = stats.result()
        finish_array(dset, attrs, array_sha256, statistics)
        return {"array_sha256": array_sha256, "statistics": statistics, "foreground": foreground,
                "tiles": len(plan.tiles), "one_pass": plan.one_pass}

    def _fingerprint_pass(self, volume: RawVolume, plan: Any, dtype: np.dtype, desc: str) -> str:
        """sha256 of the voxels in C order, read here in the single-process hash boxes."""
        digest = hashlib.sha256()
        boxes = hash_boxes(plan)
        with ThreadPoolExecutor(1, thread_name_prefix="emdata-fingerprint-read") as reader:
            ahead = reader.submit(read_tile, volume, boxes[0], dtype, desc) if boxes else None
            for i in range(len(boxes)):
                if self._stop:
                    raise ClusterError(f"{self.key}: stopped")
                assert ahead is not None
                data = ahead.result()
                if i + 1 < len(boxes):
                    ahead = reader.submit(read_tile, volume, boxes[i + 1], dtype, desc)
                digest.update(hdf5.voxel_bytes(data))
                del data
        return digest.hexdigest()
