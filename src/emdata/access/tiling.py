"""Tiled inference: run a function over blocks with halo, blend, write a chunk-aligned HDF5.

``run_tiled(volume, fn, out_path, block_shape=..., halo=..., blend=...)`` calls ``fn`` on each
block's read region (``block_shape + 2 * halo`` voxels, padded at the borders) and expects an
array of the same spatial shape back (a same-size network). Blending:

- ``crop``: keep each block's centre (its write region); the halo only gives context.
- ``average`` / ``gaussian``: every output voxel is the weighted mean of all windows covering it
  (uniform weights, or a Gaussian with sigma = 1/8 of the window, as nnU-Net does).

The output dataset has chunks equal to ``block_shape`` and each block writes whole chunks, with
the input's resolution and offset. Work is resumable: a ledger of finished blocks lives in a
scratch file beside the output (``<out>.tiling.h5``; it also holds the window predictions of the
blend modes), so a rerun after an interruption computes only the missing blocks. The output is
written as ``.<name>.partial`` and, when complete, flushed and renamed (:func:`emdata.core.atomic.commit`);
the scratch file is then removed.

The ledger is keyed by the input, the settings and the *model*, so a rerun with a different model
starts over instead of keeping the old model's blocks: the model is recognised by ``model_id=``
or by content, never by name (:mod:`emdata.access.model_identity`). Each block is predicted by
:func:`emdata.access.predict.predict_block`, here or on a Dask cluster (:mod:`emdata.access.cluster`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emdata.access.blocks import Block, block_grid, parse_triple, triple
from emdata.access.cluster import predict_on_cluster
from emdata.access.model_identity import model_identity
from emdata.access.padding import PAD_MODES
from emdata.access.predict import predict_block
from emdata.access.volume import Volume
from emdata.core.atomic import commit
from emdata.core.progress import Progress
from emdata.errors import ConfigError
from emdata.h5 import hdf5

log = logging.getLogger(__name__)
BLENDS = ("crop", "average", "gaussian")


def window_weights(shape: tuple[int, ...], blend: str) -> np.ndarray:
    """Per-voxel weights of one window (float64, strictly positive)."""
    if blend == "average":
        return np.ones(shape, np.float64)
    axes = []
    for n in shape:
        sigma = max(n / 8.0, 1e-6)
        x = np.arange(n) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-6)  # never 0: every covered voxel gets a value


def _fingerprint(volume: Volume, block: tuple[int, ...], halo: tuple[int, ...], blend: str, dtype: np.dtype,
                 pad: str, model: dict[str, str]) -> str:
    return json.dumps({
        "input": volume.identity(), "array": volume.array, "shape": list(volume.shape),
        "array_sha256": str(volume.attrs.get("array_sha256", "")), "block": list(block), "halo": list(halo),
        "blend": blend, "dtype": np.dtype(dtype).str, "pad": pad, "model": model,
    }, sort_keys=True)


def _changes(old: Any, new: str) -> str:
    """Which fingerprint fields differ, for the log ("model, halo"), or "" if unknown."""
    try:
        before, after = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return ""
    return ", ".join(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return np.ascontiguousarray(values, dtype)  # no second copy when the model already gives dtype


def _write_block(target: Any, b: Block, values: np.ndarray) -> None:
    """``target[b.write] = values``; a block that is exactly one chunk goes in as that chunk's bytes
    (the output has no filters), which skips HDF5's selection and conversion machinery."""
    chunks = target.chunks
    if (values.shape == chunks and values.dtype == target.dtype and values.flags.c_contiguous
            and all(start % c == 0 for start, c in zip(b.write_start, chunks))
            and target.id.get_create_plist().get_nfilters() == 0):
        target.id.write_direct_chunk(tuple(b.write_start), values)
    else:
        target[b.write] = values


def run_tiled(volume: Volume, fn: Callable[[np.ndarray], np.ndarray], out_path: str | os.PathLike, *,
              block_shape: tuple[int, int, int], halo: tuple[int, int, int] = (0, 0, 0), blend: str = "crop",
              dtype: np.dtype | type = np.float32, name: str = "prediction", pad: str = "reflect",
              model_id: str | None = None, client: Any = None) -> Path:
    """Run ``fn`` block by block over ``volume`` into ``out_path:/<name>``; return ``out_path``.

    A rerun after an interruption computes only the blocks the ledger lacks, provided the input,
    the settings and the model are the same; otherwise it starts over. The model is recognised by
    content (``model_identity``): a function's code, defaults, closure values and used globals, or
    a torch module's (any ``state_dict()`` object's) class and all of its attributes, recursively
    (tensors, non-persistent buffers, plain values), never by name alone; a model with state that
    cannot be hashed never resumes without ``model_id``.

    Args:
        model_id: names this exact model (e.g. a checkpoint's hash) instead of hashing ``fn``;
            the same id means "same outputs", so change it whenever the model changes. Needed to
            resume with a callable that cannot be hashed (an object without ``state_dict()``
            holding other state); without it such a run computes every block (with a warning).
        client: a ``distributed.Client``: the blocks are predicted on its workers
            (:mod:`emdata.access.cluster`) and this process writes them, with the same ledger,
            blending and output; a lost worker costs only the blocks it held.
    """
    import h5py

    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    if pad not in PAD_MODES:
        raise ConfigError(f"pad must be one of {', '.join(PAD_MODES)}, got {pad!r}")
    out_path = Path(out_path)
    dtype = np.dtype(dtype)
    block = triple(min(b, n) for b, n in zip(parse_triple(block_shape, "block_shape", 1), volume.shape))
    halo = parse_triple(halo, "halo", 0)
    blocks = list(block_grid(volume.shape, block, halo=halo, fit="pad"))
    # Not core.atomic's temporary: a resumable output the next run (another pid) continues, so its
    # name has no pid and an error keeps it; only its final flush and rename are core.atomic's.
    partial = out_path.with_name(f".{out_path.name}.partial")
    scratch_path = out_path.with_name(out_path.name + ".tiling.h5")
    fingerprint = _fingerprint(volume, block, halo, blend, dtype, pad, model_identity(fn, model_id))
    out_path.parent.mkdir(parents=True, exist_ok=True)

    try:
        scratch_file = h5py.File(scratch_path, "a")
    except OSError:  # damaged by a hard kill mid-write: its ledger cannot be trusted
        log.warning("%s: the ledger %s is unreadable; starting tiled inference over", out_path, scratch_path)
        scratch_path.unlink()
        partial.unlink(missing_ok=True)
        scratch_file = h5py.File(scratch_path, "a")
    with scratch_file as scratch:
        if scratch.attrs.get("fingerprint") != fingerprint or not partial.exists():
            if "done" in scratch:
                changed = _changes(scratch.attrs.get("fingerprint"), fingerprint) if partial.exists() else ""
                log.warning("%s: %s; starting tiled inference over", out_path,
                            f"{changed} changed" if changed else "settings changed or output missing")
            for key in list(scratch):
                del scratch[key]
            scratch.attrs["fingerprint"] = fingerprint
            # Written out, not left to the fill value: HDF5 reuses the space of the ledger just deleted
            # and, without a user fill value, does not clear it, so old flags would come back.
            scratch.create_dataset("done", data=np.zeros(len(blocks), np.uint8))
            scratch.create_dataset("blended", data=np.zeros(len(blocks), np.uint8))
            _create_output(partial, volume, name, block, dtype, blend, halo)
        done = scratch["done"]
        finished = int(np.count_nonzero(done[()]))
        if finished:
            log.info("%s: resuming, %d of %d blocks already done", out_path, finished, len(blocks))
        with h5py.File(partial, "r+") as out:
            target = out[name]
            if blend == "crop":
                _run_crop(volume, fn, blocks, done, target, dtype, pad, scratch, client)
            else:
                _run_blend(volume, fn, blocks, done, scratch, target, dtype, pad, blend, block, halo, client)
    commit(partial, out_path)
    scratch_path.unlink()
    return out_path


def _create_output(path: Path, volume: Volume, name: str, block: tuple[int, int, int], dtype: np.dtype, blend: str,
                   halo: tuple[int, ...]) -> None:
    import h5py

    with h5py.File(path, "w") as out:
        dset = out.create_dataset(name, shape=volume.shape, dtype=dtype, chunks=hdf5.chunk_shape(block, volume.shape))
        dset.attrs.update(hdf5.spatial_attrs(tuple(volume.resolution), tuple(volume.offset)))
        dset.attrs["tiling"] = json.dumps({"input": volume.location, "array": volume.array, "blend": blend,
                                           "block_shape": list(block), "halo": list(halo)})


def _crop_cast(b: Block, prediction: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return _cast(b.crop(prediction), dtype)


def _as_is(b: Block, prediction: np.ndarray) -> np.ndarray:
    return prediction


def predictions(volume: Volume, fn: Callable, blocks: list[Block], todo: list[int], pad: str,
                post: Callable[[Block, np.ndarray], np.ndarray], client: Any = None):
    """``(i, post(block i, fn(read region)))`` for each block in ``todo``: here in order, or on the
    workers of ``client`` in the order they finish."""
    if client is not None:
        yield from predict_on_cluster(client, volume, fn, blocks, todo, pad, post)
        return
    for i in todo:
        yield i, post(blocks[i], predict_block(volume, fn, blocks[i], pad))


def _run_crop(volume, fn, blocks, done, target, dtype, pad, scratch, client=None) -> None:
    todo = [i for i in range(len(blocks)) if not done[i]]
    with Progress(len(blocks), "tiled inference", unit="block") as progress:
        progress.update(len(blocks) - len(todo))
        for i, values in predictions(volume, fn, blocks, todo, pad, functools.partial(_crop_cast, dtype=dtype),
                                     client):
            _write_block(target, blocks[i], values)
            target.file.flush()
            done[i] = 1
            scratch.flush()  # the ledger entry follows the data it vouches for
            progress.update(1)


def _run_blend(volume, fn, blocks, done, scratch, target, dtype, pad, blend, block, halo, client=None) -> None:
    window = blocks[0].read_shape
    if "windows" not in scratch:
        scratch.create_dataset("windows", shape=(len(blocks), *window), dtype=np.float32 if dtype.itemsize <= 4
                               else np.float64, chunks=(1, *window))
    windows = scratch["windows"]
    todo = [i for i in range(len(blocks)) if not done[i]]
    with Progress(len(blocks), "tiled inference", unit="block") as progress:
        progress.update(len(blocks) - len(todo))
        for i, prediction in predictions(volume, fn, blocks, todo, pad, _as_is, client):
            windows[i] = prediction
            scratch.flush()
            done[i] = 1
            scratch.flush()
            progress.update(1)
    weights = window_weights(window, blend)
    reach = [math.ceil(h / s) if h else 0 for h, s in zip(halo, block)]
    index_of = {b.index: i for i, b in enumerate(blocks)}
    blended = scratch["blended"]
    for i, b in enumerate(blocks):
        if blended[i]:
            continue
        total = np.zeros(b.write_shape, np.float64)
        weight = np.zeros(b.write_shape, np.float64)
        for dz in range(-reach[0], reach[0] + 1):
            for dy in range(-reach[1], reach[1] + 1):
                for dx in range(-reach[2], reach[2] + 1):
                    j = index_of.get((b.index[0] + dz, b.index[1] + dy, b.index[2] + dx))
                    if j is None:
                        continue
                    w = blocks[j]
                    lo = [max(a, c) for a, c in zip(b.write_start, w.read_start)]
                    hi = [min(a, c) for a, c in zip(b.write_stop, w.read_stop)]
                    if any(h <= l for l, h in zip(lo, hi)):
                        continue
                    in_window = tuple(slice(l - r, h - r) for l, h, r in zip(lo, hi, w.read_start))
                    in_block = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, b.write_start))
                    wt = weights[in_window]
                    total[in_block] += wt * windows[(j,) + in_window]
                    weight[in_block] += wt
        target[b.write] = _cast(total / weight, dtype)
        target.file.flush()
        blended[i] = 1
        scratch.flush()
