"""Tiled inference on a Dask distributed cluster: ``run_tiled(..., client=distributed.Client)``.

The workers read each block's window from the volume (a :class:`~emdata.access.volume.Volume`
pickles with its storage but without open files: a local file is opened again on the worker, so
it must be at the same path there, e.g. on a shared file system; a remote one reads from its DVC
remote) and call the model (:func:`emdata.access.predict.predict_block`); this process receives
the predictions and writes them, with the same ledger, blending and output file as a
single-process run (:mod:`emdata.access.tiling`), so the result is the same array.

Predictions come straight from the workers (``gather(direct=True)``) unless the client was
created with ``direct_to_workers=False``. The model and the volume are sent to every worker once (``scatter(broadcast=True)``); at most
a window of blocks (twice the cluster's threads, at least 4) is in flight, so a slow writer
never piles predictions up in worker memory. A block is marked done in the ledger only after its
prediction is written, so a worker that dies costs only the blocks it held (Dask runs them again
on another worker), and a rerun after this process dies computes only the blocks the ledger lacks.
"""

from __future__ import annotations

import hashlib
import logging
from asyncio import TimeoutError as AsyncioTimeout  # before Python 3.11, not the builtin one
from collections import deque
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable, Iterator

import numpy as np

from emdata.access.blocks import Block
from emdata.access.predict import predict_and_post
from emdata.errors import ClusterError, EmdataError

log = logging.getLogger(__name__)


def predict_on_cluster(client: Any, volume: Any, fn: Callable, blocks: list[Block], todo: list[int], pad: str,
                       post: Callable[[Block, np.ndarray], np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, prediction)`` for each block in ``todo``, in the order the workers finish them."""
    from distributed import KilledWorker, as_completed
    from distributed.comm.core import CommClosedError

    if not todo:
        return
    try:
        threads = sum(client.nthreads().values())
    except Exception as exc:  # noqa: BLE001 - a closed client, an unreachable scheduler
        raise ClusterError(f"tiled inference: the Dask client cannot reach its scheduler ({type(exc).__name__}: "
                           f"{exc})") from exc
    if threads == 0:
        log.warning("tiled inference: the cluster has no workers yet; blocks wait until one joins")
    window = max(4, 2 * threads)
    # Predictions are megabytes each: fetch them from the workers rather than relayed by the
    # scheduler (Dask's default), which carries every byte twice. A client that cannot reach the
    # workers (behind a gateway) is created with direct_to_workers=False, and that choice is kept.
    direct = getattr(client, "direct_to_workers", None)
    direct = True if direct is None else bool(direct)
    shared_volume, shared_fn = client.scatter([volume, fn], broadcast=True, hash=False)
    tag = hashlib.sha1(f"{volume.identity()}:{id(fn)}:{id(todo)}".encode()).hexdigest()[:10]
    queue = deque(todo)
    owner: dict[str, int] = {}
    pending = as_completed(loop=client.loop, with_results=False)

    def submit() -> None:
        i = queue.popleft()
        future = client.submit(predict_and_post, shared_volume, shared_fn, blocks[i], pad, post,
                               key=f"emdata-tiled-{tag}-{i}", retries=2)
        owner[future.key] = i
        pending.add(future)

    for _ in range(min(window, len(queue))):
        submit()
    try:
        for future in pending:
            i = owner.pop(future.key)
            try:
                result = client.gather(future, direct=direct)
            except EmdataError:
                raise
            except Exception as exc:
                if isinstance(exc, (KilledWorker, CommClosedError, CancelledError, TimeoutError, AsyncioTimeout,
                                    FuturesTimeout)):
                    raise ClusterError(f"tiled inference: block {i} could not be computed on the cluster "
                                       f"({type(exc).__name__}: {exc}); finished blocks are in the ledger, run "
                                       "again to resume") from exc
                raise  # the model's own error, as in a single-process run
            future.release()
            if queue:
                submit()
            yield i, result
    finally:
        leftover = [f for f in pending.futures] if hasattr(pending, "futures") else []
        if leftover:
            client.cancel(leftover)
        client.cancel([shared_volume, shared_fn])
