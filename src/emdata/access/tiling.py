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
written as ``.<name>.partial`` and renamed when complete; the scratch file is then removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..io import hdf5
from ..progress import Progress
from .blocks import Block, block_grid, parse_triple
from .volume import Volume

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
                 pad: str, fn: Callable) -> str:
    return json.dumps({
        "input": str(volume.path.resolve()), "array": volume.array, "shape": list(volume.shape),
        "array_sha256": str(volume.attrs.get("array_sha256", "")), "block": list(block), "halo": list(halo),
        "blend": blend, "dtype": np.dtype(dtype).str, "pad": pad,
        "fn": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(type(fn)))}",
    }, sort_keys=True)


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def run_tiled(volume: Volume, fn: Callable[[np.ndarray], np.ndarray], out_path: str | os.PathLike, *,
              block_shape: tuple[int, int, int], halo: tuple[int, int, int] = (0, 0, 0), blend: str = "crop",
              dtype: np.dtype | type = np.float32, name: str = "prediction", pad: str = "reflect") -> Path:
    """Run ``fn`` block by block over ``volume`` into ``out_path:/<name>``; return ``out_path``."""
    import h5py

    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    out_path = Path(out_path)
    dtype = np.dtype(dtype)
    block = tuple(min(b, n) for b, n in zip(parse_triple(block_shape, "block_shape", 1), volume.shape))
    halo = parse_triple(halo, "halo", 0)
    blocks = list(block_grid(volume.shape, block, halo=halo, fit="pad"))
    partial = out_path.with_name(f".{out_path.name}.partial")
    scratch_path = out_path.with_name(out_path.name + ".tiling.h5")
    fingerprint = _fingerprint(volume, block, halo, blend, dtype, pad, fn)
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
                log.warning("%s: settings changed or output missing; starting tiled inference over", out_path)
            for key in list(scratch):
                del scratch[key]
            scratch.attrs["fingerprint"] = fingerprint
            scratch.create_dataset("done", shape=(len(blocks),), dtype=np.uint8)
            scratch.create_dataset("blended", shape=(len(blocks),), dtype=np.uint8)
            _create_output(partial, volume, name, block, dtype, blend, halo)
        done = scratch["done"]
        finished = int(np.count_nonzero(done[()]))
        if finished:
            log.info("%s: resuming, %d of %d blocks already done", out_path, finished, len(blocks))
        with h5py.File(partial, "r+") as out:
            target = out[name]
            if blend == "crop":
                _run_crop(volume, fn, blocks, done, target, dtype, pad, scratch)
            else:
                _run_blend(volume, fn, blocks, done, scratch, target, dtype, pad, blend, block, halo)
    os.replace(partial, out_path)
    scratch_path.unlink()
    return out_path


def _create_output(path: Path, volume: Volume, name: str, block: tuple[int, ...], dtype: np.dtype, blend: str,
                   halo: tuple[int, ...]) -> None:
    import h5py

    with h5py.File(path, "w") as out:
        dset = out.create_dataset(name, shape=volume.shape, dtype=dtype, chunks=hdf5.chunk_shape(block, volume.shape))
        dset.attrs.update(hdf5.spatial_attrs(tuple(volume.resolution), tuple(volume.offset)))
        dset.attrs["tiling"] = json.dumps({"input": str(volume.path), "array": volume.array, "blend": blend,
                                           "block_shape": list(block), "halo": list(halo)})


def _predict(volume: Volume, fn: Callable, b: Block, pad: str) -> np.ndarray:
    result = np.asarray(fn(volume.read_block(b, pad=pad)))
    if result.shape[:3] != b.read_shape or result.ndim != 3:
        raise ConfigError(f"tiled inference: fn returned shape {result.shape} for an input of {b.read_shape}; "
                          "a same-size 3D output is expected")
    return result


def _run_crop(volume, fn, blocks, done, target, dtype, pad, scratch) -> None:
    with Progress(len(blocks), "tiled inference", unit="block") as progress:
        for i, b in enumerate(blocks):
            if not done[i]:
                target[b.write] = _cast(b.crop(_predict(volume, fn, b, pad)), dtype)
                target.file.flush()
                done[i] = 1
                scratch.flush()  # the ledger entry follows the data it vouches for
            progress.update(1)


def _run_blend(volume, fn, blocks, done, scratch, target, dtype, pad, blend, block, halo) -> None:
    window = blocks[0].read_shape
    if "windows" not in scratch:
        scratch.create_dataset("windows", shape=(len(blocks), *window), dtype=np.float32 if dtype.itemsize <= 4
                               else np.float64, chunks=(1, *window))
    windows = scratch["windows"]
    with Progress(len(blocks), "tiled inference", unit="block") as progress:
        for i, b in enumerate(blocks):
            if not done[i]:
                windows[i] = _predict(volume, fn, b, pad)
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
                    total[in_block] += wt * windows[(j, *in_window)]
                    weight[in_block] += wt
        target[b.write] = _cast(total / weight, dtype)
        target.file.flush()
        blended[i] = 1
        scratch.flush()
