"""Where a :class:`~emdata.access.volume.Volume` gets its bytes: the ``Storage`` protocol.

A Volume does the same work on any storage (geometry, slicing, padding, nm ROIs, labels, dask
views); a storage only knows one file's arrays and reads boxes of them:

- :class:`~emdata.access.local.LocalStorage`: the HDF5 file on this machine, memory-mapped
  chunks when uncompressed (through the chunk-offset index when one matches), h5py otherwise;
- :class:`~emdata.access.remote.RemoteStorage`: the same file left in a DVC remote, read by
  byte ranges through its chunk-offset index.

One storage stands for one version of one file, shared by a Volume and the label Volumes made
from it, so a sample's image and labels always come from the same version. Storages pickle
without open files or connections: the receiver (a DataLoader or Dask worker) opens its own.

Coordinates are three-dimensional everywhere: a 2D image is a volume of one Z plane, so a box of
it is ``(0, y0, x0)..(1, y1, x1)``; a storage returns ``stop - start`` voxels, C order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ArrayInfo:
    """One stored array as its file describes it."""

    stored_shape: tuple[int, ...]  # as stored: (Y, X) for a 2D image, (Z, Y, X) or (T, Y, X) otherwise
    dtype: np.dtype
    stored_chunks: tuple[int, ...]  # the chunk shape as stored (the whole array if contiguous)
    attrs: dict[str, Any]
    label_names: tuple[str, ...] = field(default=())  # the file's label arrays (only for the raw array)

    @property
    def shape(self) -> tuple[int, int, int]:
        """ZYX: a 2D image is one Z plane."""
        return _three(self.stored_shape)

    @property
    def chunks(self) -> tuple[int, int, int]:
        return _three(self.stored_chunks)


def _three(values: tuple[int, ...]) -> tuple[int, int, int]:
    return (1,) * (3 - len(values)) + tuple(values)  # type: ignore[return-value]


class Storage(Protocol):
    """One version of one emdata HDF5 file, wherever it is."""

    name: str  # the dataset name or file stem, for messages
    location: str  # the file's path or URL, for messages and records
    path: Path | None  # the local file, or None when there is none (remote)

    def describe(self, array: str, name: str) -> ArrayInfo:
        """The array's layout and attributes; FormatError or ConfigError (naming ``name``) if unusable."""
        ...

    def read_box(self, array: str, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """Voxels ``[start, stop)`` of a described array, inside it (ZYX)."""
        ...

    def root_attrs(self, array: str) -> dict[str, Any]:
        """The file's root attributes, from the version ``array`` is read from."""
        ...

    def chunk_foreground(self, label: str) -> np.ndarray | None:
        """Nonzero voxels per chunk of ``/labels/<label>`` (written by normalize), None if absent."""
        ...

    def identity(self) -> str:
        """What names this file in ledgers: its resolved path, or its URL."""
        ...

    def close(self) -> None:
        """Release open files (a later read opens them again)."""
        ...
