"""Issue 20: formats, geometry and normalize that must not give silently wrong data or useless advice.

- a classic (libtiff-style) TIFF cut short is refused, not read as fewer planes;
- geometry offsets are compared in voxels, voxel sizes relatively (one rule for params/source,
  labels/image and OME-Zarr grids);
- normalize reads the fetch record under the dataset lock, so provenance and voxels describe the
  same raw files;
- error advice is something that helps (not "fetch again" for an RGB TIFF, not a bare
  ``emdata fetch`` that answers "up to date"); DM3 spectral axes are not spatial; the HDF5
  writer's unraisable-exception hook is scoped and thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pytest

from emdata.errors import FormatError
from emdata.testing.epfl import FOLDER
from emdata.testing.volumes import coordinate_volume

DS = "epfl_hippocampus"
IMAGE = "volumedata.tif"


# -- item 7: the fetch record is read under the lock -------------------------------------------


def test_normalize_reads_the_fetch_record_under_the_lock(epfl_project, epfl_replica, monkeypatch) -> None:
    """A fetch that finishes just before normalize takes the lock: provenance must describe the new files."""
    import emdata.normalize as normalize_module
    from emdata.normalize import normalize_dataset
    from emdata.pipeline import fetch_dataset

    cfg = epfl_project
    raw = cfg.raw_dir(DS)
    fetch_dataset(cfg, DS)
    old = raw.with_name("old-fetch")
    shutil.move(raw, old)
    # The server's file changes (same size: EPFL pins only the size); the next fetch gets version B.
    served = epfl_replica.root / FOLDER / IMAGE
    new_volume = epfl_replica.arrays[IMAGE][::-1].copy()
    from emdata.testing.volumes import write_tiff_stack

    write_tiff_stack(served, new_volume)
    fetch_dataset(cfg, DS)
    new = raw.with_name("new-fetch")
    shutil.move(raw, new)
    shutil.move(old, raw)  # normalize starts with version A in place
    real_lock = normalize_module.dataset_lock

    @contextlib.contextmanager
    def lock_after_a_fetch(*args: Any, **kwargs: Any) -> Iterator[None]:
        # fetch renames its finished folder into place (pipeline._replace_dir), then normalize locks
        shutil.rmtree(raw)
        shutil.move(new, raw)
        with real_lock(*args, **kwargs):
            yield

    monkeypatch.setattr(normalize_module, "dataset_lock", lock_after_a_fetch)
    path = normalize_dataset(cfg, DS)
    with h5py.File(path, "r") as f:
        record = json.loads(f["provenance/source_record"][()])
        voxels = f["raw"][()]
    np.testing.assert_array_equal(voxels, new_volume)
    recorded = record["files"][IMAGE]["sha256"]
    assert recorded == hashlib.sha256((raw / IMAGE).read_bytes()).hexdigest(), \
        "the HDF5's provenance names the raw file of another fetch than its voxels came from"
