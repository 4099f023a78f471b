"""Replicas by source kind: what the demo, the DVC tests and the contract tests iterate.

A replica stands up loopback servers that speak a real service's protocol and serve small
generated data. Built-in replicas are listed in ``REPLICAS``; other packages (or a test) add
theirs through the ``emdata.replicas`` entry-point group (``kind = "module:attribute"``), so a
new source is one source module plus one replica, with no per-kind branch anywhere.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from emdata.errors import EmdataError

ENTRY_POINT_GROUP = "emdata.replicas"
REPLICAS: dict[str, str] = {
    "epfl": "emdata.testing.epfl:REPLICA",
    "empiar": "emdata.testing.empiar:REPLICA",
    "idr": "emdata.testing.idr:REPLICA",
    "precomputed": "emdata.testing.precomputed:REPLICA",
    "lightmycells": "emdata.testing.lightmycells:REPLICA",
    "labelme_tracking": "emdata.testing.labelme_tracking:REPLICA",
    "ome_zarr_s3": "emdata.testing.ome_zarr_s3:REPLICA",
}


@dataclass
class ReplicaCase:
    """One dataset served by a running replica, and what normalize must make of it.

    A volume's ``expected`` maps "raw" and "labels/<name>" to voxels; a collection's maps the
    HDF5 paths of its arrays and tables (``images/<id>/<path>``, e.g. ``images/3/inputs/BF_z0``
    or ``images/W_E4_12/annotations/boxes``) to arrays, and ``resolutions`` gives the pixel size
    each array must record (one entry per spatial axis). A local-import replica (transport
    "local") gives the source file to damage as ``fault_path``.
    """

    key: str
    dataset: dict[str, Any]  # a params.yaml ``datasets`` entry pointing at the replica
    expected: dict[str, np.ndarray]  # "raw" and "labels/<name>" -> voxels (ZYX), or collection paths
    voxel_size_nm: tuple[float, float, float]  # what the HDF5 must record
    offset_nm: tuple[float, float, float]
    fault_path: str | None = None  # the largest file's URL path or object key, for fault injection
    files: dict[str, str] = field(default_factory=dict)  # raw-folder relpath -> URL path (or key)
    # Pin a file's size in a params entry, in place: (entry, raw relpath, size). For sources whose
    # params have no ``{file: ...}`` spec of that file (the contract's size tests use those when present).
    pin_size: Callable[[dict[str, Any], str, int], None] | None = None
    resolutions: dict[str, tuple[float, ...]] = field(default_factory=dict)  # collection array -> resolution


class RunningReplica(Protocol):
    server: Any  # the transport's server: request log and fault injection (e.g. ReplicaServer)

    def cases(self) -> list[ReplicaCase]:
        """Datasets this replica serves, small enough for tests."""

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """A real params.yaml entry rewritten to this replica (pins it cannot honour dropped)."""


class Replica(Protocol):
    kind: str
    transport: str  # "http", "http-array", "s3" or "local": which transport mixin of the contract applies
    # The dataset keys ``cases()`` returns, in order: test collection reads them instead of starting
    # servers (the contract checks that a running replica serves exactly these).
    case_keys: tuple[str, ...]

    def start(self, root: Path, *, coordinate: bool = True) -> AbstractContextManager[RunningReplica]:
        """Write the data under ``root`` and serve it until the context exits."""


def replica_targets() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {**{ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}, **REPLICAS}


def registered_kinds() -> list[str]:
    return sorted(replica_targets())


def case_keys(replica: Replica) -> tuple[str, ...]:
    """The dataset keys a replica serves, as it declares them (nothing is started)."""
    keys = getattr(replica, "case_keys", None)
    if not isinstance(keys, tuple) or not keys or not all(isinstance(k, str) for k in keys):
        raise EmdataError(f"replica {getattr(replica, 'kind', replica)!r} declares no case_keys: give its kind "
                          "a tuple of the dataset keys its cases() returns, in order")
    return keys


def replica_for(kind: str) -> Replica:
    target = replica_targets().get(kind)
    if target is None:
        raise EmdataError(f"no replica is registered for source kind {kind!r} "
                          f"(registered: {', '.join(registered_kinds())})")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or "REPLICA")
