"""The source contract, run for every replica in the registry: no per-kind code here.

Each registered kind is started once per test (small generated data on loopback) and every case
it serves runs the core contract plus the mixin of its transport.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emdata.config import load_config
from emdata.testing.contract import (ArrayHttpContract, CoreContract, HttpContract, LocalContract, S3Contract,
                                      SourceCase)
from emdata.testing.registry import case_count, registered_kinds, replica_for


def _cases(transport: str) -> list[tuple[str, int]]:
    """(kind, case index) for every registered kind of this transport (no server starts when the
    replica declares its ``case_keys``)."""
    out = []
    for kind in registered_kinds():
        replica = replica_for(kind)
        if replica.transport == transport:
            out += [(kind, i) for i in range(case_count(replica))]
    return out


def _make_case(kind: str, index: int, tmp_path: Path):
    replica = replica_for(kind)
    with replica.start(tmp_path / "replica") as running:
        rc = running.cases()[index]
        root = tmp_path / "project"
        root.mkdir()
        params = {"normalize": {"chunks": [8, 16, 16]}, "datasets": {rc.key: rc.dataset}}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        yield SourceCase(cfg=load_config(root), key=rc.key, server=running.server, expected=rc.expected,
                         big_file=rc.fault_path or "", reload=lambda: load_config(root),
                         voxel_size_nm=rc.voxel_size_nm, offset_nm=rc.offset_nm, files=rc.files,
                         pin_size=rc.pin_size, resolutions=rc.resolutions)


@pytest.mark.parametrize("kind_case", _cases("http"), ids=lambda kc: f"{kc[0]}-{kc[1]}")
class TestHttpSources(CoreContract, HttpContract):
    @pytest.fixture
    def case(self, kind_case, tmp_path):
        yield from _make_case(*kind_case, tmp_path)


@pytest.mark.parametrize("kind_case", _cases("http-array"), ids=lambda kc: f"{kc[0]}-{kc[1]}")
class TestArrayHttpSources(CoreContract, ArrayHttpContract):
    @pytest.fixture
    def case(self, kind_case, tmp_path):
        yield from _make_case(*kind_case, tmp_path)


@pytest.mark.parametrize("kind_case", _cases("s3"), ids=lambda kc: f"{kc[0]}-{kc[1]}")
class TestS3Sources(CoreContract, S3Contract):
    @pytest.fixture
    def case(self, kind_case, tmp_path):
        yield from _make_case(*kind_case, tmp_path)


@pytest.mark.parametrize("kind_case", _cases("local"), ids=lambda kc: f"{kc[0]}-{kc[1]}")
class TestLocalSources(CoreContract, LocalContract):
    @pytest.fixture
    def case(self, kind_case, tmp_path):
        yield from _make_case(*kind_case, tmp_path)
