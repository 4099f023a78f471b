"""Offline replica of the EPFL CVLab file server (documents.epfl.ch).

The same URL path as the real server (the folder name begins with a space, ``%20``), the same
five classic multipage TIFFs, shrunk to odd, non-cubic shapes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from emdata.errors import EmdataError
from emdata.testing.http_server import ReplicaServer
from emdata.testing.registry import ReplicaCase
from emdata.testing.volumes import blob_labels, coordinate_volume, em_like_volume, write_tiff_stack

EPFL_PATH = "/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
FOLDER = "groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus"
LABEL_VALUES = {"mitochondria": {255: 1}}  # as params.yaml: the 0/255 masks are stored as 0/1
DEMO_SHAPES = {"volume_shape": (80, 211, 257), "bench_shape": (45, 97, 131)}


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
              "citation": "Lucchi et al., IEEE TMI 2012 (replica data)", "voxel_size_nm": [5.0, 5.0, 5.0],
              "offset_nm": [0.0, 0.0, 0.0]}
    return {
        "epfl_hippocampus": {"title": "EPFL hippocampus (replica)", **common,
                             "source": {"kind": "epfl", "base_url": base_url, "image": {"file": "volumedata.tif"}}},
        "epfl_mito_train": {"title": "EPFL mito train (replica)", **common, "label_values": LABEL_VALUES,
                            "source": {"kind": "epfl", "base_url": base_url, "image": {"file": "training.tif"},
                                       "labels": {"mitochondria": {"file": "training_groundtruth.tif"}}}},
        "epfl_mito_test": {"title": "EPFL mito test (replica)", **common, "label_values": LABEL_VALUES,
                           "source": {"kind": "epfl", "base_url": base_url, "image": {"file": "testing.tif"},
                                      "labels": {"mitochondria": {"file": "testing_groundtruth.tif"}}}},
    }


# Which replica file stands for which dataset, and the arrays normalize must produce.
_CASES = {
    "epfl_hippocampus": ("volumedata.tif", {}),
    "epfl_mito_train": ("training.tif", {"mitochondria": "training_groundtruth.tif"}),
    "epfl_mito_test": ("testing.tif", {"mitochondria": "testing_groundtruth.tif"}),
}


@dataclass
class RunningEpfl:
    replica: EpflReplica
    server: ReplicaServer

    @property
    def base_url(self) -> str:
        return self.replica.base_url(self.server.url)

    def cases(self) -> list[ReplicaCase]:
        datasets = epfl_datasets(self.base_url)
        out = []
        for key, (image, labels) in _CASES.items():
            expected = {"raw": self.replica.arrays[image]}
            for n, f in labels.items():  # stored with params' label_values applied (255 -> 1)
                native = self.replica.arrays[f]
                expected[f"labels/{n}"] = np.where(native == 255, 1, native).astype(native.dtype)
            files = {name: EPFL_PATH + name for name in [image, *labels.values()]}
            out.append(ReplicaCase(key, datasets[key], expected, (5.0, 5.0, 5.0), (0.0, 0.0, 0.0),
                                   fault_path=EPFL_PATH + image, files=files))
        return out

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """Point an EPFL entry at the replica; drop size/sha256 pins (the replica files are smaller)."""
        out = {**dataset, "source": dict(dataset["source"])}
        src = out["source"]
        src["base_url"] = self.base_url
        specs = [src["image"], *(src.get("labels") or {}).values()]
        src["image"] = _unpinned(src["image"])
        if src.get("labels"):
            src["labels"] = {n: _unpinned(v) for n, v in src["labels"].items()}
        for spec in specs:
            if spec["file"] not in self.replica.arrays:
                raise EmdataError(f"demo: {key}: the EPFL replica has no file {spec['file']!r} "
                                  f"(it serves {', '.join(sorted(self.replica.arrays))})")
        return out


def _unpinned(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("size", "sha256")}


class _EpflReplicaKind:
    kind = "epfl"
    transport = "http"
    case_keys = tuple(_CASES)

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True) -> Iterator[RunningEpfl]:
        """Coordinate-encoded small volumes for tests; larger EM-like ones (nicer thumbnails) for the demo."""
        shapes = {} if coordinate else DEMO_SHAPES
        replica = build_epfl_replica(Path(root), coordinate=coordinate, **shapes)
        with ReplicaServer(replica.root) as server:
            yield RunningEpfl(replica, server)


REPLICA = _EpflReplicaKind()
