"""Offline replica of the EPFL CVLab file server (documents.epfl.ch).

The same URL path as the real server (the folder name begins with a space, ``%20``), the same
five classic multipage TIFFs, shrunk to odd, non-cubic shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .volumes import blob_labels, coordinate_volume, em_like_volume, write_tiff_stack

EPFL_PATH = "/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
FOLDER = "groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus"


@dataclass
class EpflReplica:
    """The files written under a server root, and the arrays they hold."""

    root: Path
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def base_url(self, server_url: str) -> str:
        return server_url + EPFL_PATH

    def url_path(self, name: str) -> str:
        return EPFL_PATH + name


def build_epfl_replica(root: Path, *, volume_shape: tuple[int, int, int] = (21, 37, 53),
                       bench_shape: tuple[int, int, int] = (17, 29, 43), coordinate: bool = True) -> EpflReplica:
    """Write the five EPFL files under ``root``; coordinate-encoded by default, EM-like if not."""
    make = coordinate_volume if coordinate else (lambda shape: em_like_volume(shape))
    replica = EpflReplica(Path(root))
    arrays = {
        "volumedata.tif": make(volume_shape),
        "training.tif": make(bench_shape),
        "training_groundtruth.tif": blob_labels(bench_shape, seed=1),
        "testing.tif": make(bench_shape)[::-1].copy(),
        "testing_groundtruth.tif": blob_labels(bench_shape, seed=2),
    }
    for name, array in arrays.items():
        write_tiff_stack(replica.root / FOLDER / name, array)
    replica.arrays = arrays
    return replica


def epfl_datasets(base_url: str) -> dict[str, Any]:
    """``datasets`` entries of params.yaml that point the three EPFL datasets at ``base_url``."""
    common = {"modality": "FIB-SEM", "license": "research use with citation (replica)",
              "citation": "Lucchi et al., IEEE TMI 2012 (replica data)", "voxel_size_nm": [5.0, 5.0, 5.0]}
    return {
        "epfl_hippocampus": {"title": "EPFL hippocampus (replica)", **common,
                             "source": {"kind": "epfl", "base_url": base_url, "image": {"file": "volumedata.tif"}}},
        "epfl_mito_train": {"title": "EPFL mito train (replica)", **common,
                            "source": {"kind": "epfl", "base_url": base_url, "image": {"file": "training.tif"},
                                       "labels": {"mitochondria": {"file": "training_groundtruth.tif"}}}},
        "epfl_mito_test": {"title": "EPFL mito test (replica)", **common,
                           "source": {"kind": "epfl", "base_url": base_url, "image": {"file": "testing.tif"},
                                      "labels": {"mitochondria": {"file": "testing_groundtruth.tif"}}}},
    }
