"""The source contract, run for every replica in the registry: no per-kind code here.

Collection starts nothing: each kind declares its ``case_keys``. A kind's replica starts once per
module (on its first test, on whichever xdist worker runs it) and every case it serves runs the
core contract plus the mixin of its transport, each test in a fresh project folder. Between
tests the server's faults and log are reset and the served files are put back as they were, so
one test's damage never reaches the next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from emdata.params.config import load_config
from emdata.testing.contract import (
    ArrayHttpContract,
    CoreContract,
    HttpContract,
    LocalContract,
    S3Contract,
    SourceCase,
)
from emdata.testing.registry import case_keys, registered_kinds, replica_for


def _cases(transport: str) -> list[Any]:
    """One parameter per (kind, case) of this transport, named ``<kind>-<dataset key>``."""
    out = []
    for kind in registered_kinds():
        replica = replica_for(kind)
        if replica.transport == transport:
            out += [pytest.param((kind, i), id=f"{kind}-{key}") for i, key in enumerate(case_keys(replica))]
    return out


class _Served:
    """Every served file's bytes and times, to put back after a test changed, moved or removed one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = {p: (p.read_bytes(), p.stat()) for p in root.rglob("*") if p.is_file()}

    def restore(self) -> None:
        for path in [p for p in self.root.rglob("*") if p.is_file() and p not in self.files]:
            path.unlink()
        for path, (data, stat) in self.files.items():
            now = path.stat() if path.is_file() else None
            if now is None or now.st_size != stat.st_size or now.st_mtime_ns != stat.st_mtime_ns \
                    or path.read_bytes() != data:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


class _Running:
    def __init__(self, running: Any) -> None:
        self.running = running
        self.cases = running.cases()
        root = getattr(running.server, "root", None)  # files on disk (HTTP, local); S3 objects are immutable
        self.served = _Served(Path(root)) if root is not None else None


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, _Running]]:
    """Each kind's replica, started on first use and stopped when the module ends."""
    class Lazy(dict):
        def __missing__(self, kind: str) -> _Running:
            running = stack.enter_context(replica_for(kind).start(tmp_path_factory.mktemp(f"replica-{kind}")))
            self[kind] = _Running(running)
            return self[kind]

    with ExitStack() as stack:
        yield Lazy()


@pytest.fixture
def case(kind_case: tuple[str, int], replicas: dict[str, _Running], tmp_path: Path) -> Iterator[SourceCase]:
    kind, index = kind_case
    shared = replicas[kind]
    rc = shared.cases[index]
    assert tuple(c.key for c in shared.cases) == case_keys(replica_for(kind)), \
        f"replica {kind!r} serves other keys than its case_keys"
    root = tmp_path / "project"
    root.mkdir()
    params = {"normalize": {"chunks": [8, 16, 16]}, "datasets": {rc.key: rc.dataset}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shared.running.server.reset()
    try:
        yield SourceCase(cfg=load_config(root), key=rc.key, server=shared.running.server, expected=rc.expected,
                         big_file=rc.fault_path or "", reload=lambda: load_config(root),
                         voxel_size_nm=rc.voxel_size_nm, offset_nm=rc.offset_nm, files=rc.files,
                         pin_size=rc.pin_size, resolutions=rc.resolutions)
    finally:
        shared.running.server.reset()
        if shared.served is not None:
            shared.served.restore()


# scope="module": pytest orders the tests by kind, so each replica serves its tests in one run
@pytest.mark.parametrize("kind_case", _cases("http"), scope="module")
class TestHttpSources(CoreContract, HttpContract):
    pass


@pytest.mark.parametrize("kind_case", _cases("http-array"), scope="module")
class TestArrayHttpSources(CoreContract, ArrayHttpContract):
    pass


@pytest.mark.parametrize("kind_case", _cases("s3"), scope="module")
class TestS3Sources(CoreContract, S3Contract):
    pass


@pytest.mark.parametrize("kind_case", _cases("local"), scope="module")
class TestLocalSources(CoreContract, LocalContract):
    pass
