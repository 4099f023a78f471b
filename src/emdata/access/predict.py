"""Predict one block: what tiled inference runs per block, here or on a cluster's workers.

Both :mod:`emdata.access.tiling` (in this process) and :mod:`emdata.access.cluster` (on Dask
workers) call :func:`predict_block`, so a block's prediction is the same wherever it runs.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from emdata.access.blocks import Block
from emdata.errors import ConfigError


def predict_block(volume: Any, fn: Callable[[np.ndarray], Any], block: Block, pad: str) -> np.ndarray:
    """``fn`` of the block's read window (padded with ``pad`` at the borders), checked to be the
    same spatial shape (a same-size 3D model)."""
    result = np.asarray(fn(volume.read_block(block, pad=pad)))
    if result.shape[:3] != block.read_shape or result.ndim != 3:
        raise ConfigError(f"tiled inference: fn returned shape {result.shape} for an input of {block.read_shape}; "
                          "a same-size 3D output is expected")
    return result


def predict_and_post(volume: Any, fn: Callable[[np.ndarray], Any], block: Block, pad: str,
                     post: Callable[[Block, np.ndarray], np.ndarray]) -> np.ndarray:
    """``post(block, prediction)``: the task a cluster worker runs (the post step, e.g. crop and
    cast, shrinks what travels back)."""
    return post(block, predict_block(volume, fn, block, pad))
