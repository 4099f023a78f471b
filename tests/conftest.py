"""Shared fixtures: loopback replicas, throw-away projects, an offline environment for DVC."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from emdata.config import Config, load_config
from emdata.testing.epfl import EpflReplica, build_epfl_replica, epfl_datasets
from emdata.testing.http_server import ReplicaServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No analytics, no EC2 metadata probe, no user AWS/DVC config, whatever the caller's shell has."""
    scratch = tmp_path_factory.getbasetemp() / "env"
    scratch.mkdir(exist_ok=True)
    empty = scratch / "empty"
    empty.touch()
    for key, value in {
        "DVC_NO_ANALYTICS": "1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
        "DVC_SITE_CACHE_DIR": str(scratch / "dvc-site"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("EMDATA_PROJECT", raising=False)
    monkeypatch.delenv("EMDATA_DEBUG", raising=False)
    monkeypatch.delenv("EMDATA_READ_TIMEOUT", raising=False)
    monkeypatch.delenv("EMDATA_FETCH_WORKERS", raising=False)


@pytest.fixture
def epfl_replica(tmp_path: Path) -> EpflReplica:
    return build_epfl_replica(tmp_path / "www")


@pytest.fixture
def server(epfl_replica: EpflReplica):
    with ReplicaServer(epfl_replica.root) as srv:
        yield srv


ProjectFactory = Callable[..., Config]


@pytest.fixture
def make_project(tmp_path: Path) -> ProjectFactory:
    """Write params.yaml into a fresh folder and load it; keyword arguments edit the params."""

    def make(datasets: dict[str, Any], normalize: dict[str, Any] | None = None, name: str = "project") -> Config:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        params = {"normalize": normalize or {"chunks": [8, 16, 16]}, "datasets": datasets}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return load_config(root)

    return make


@pytest.fixture
def epfl_project(make_project: ProjectFactory, server: ReplicaServer, epfl_replica: EpflReplica) -> Config:
    return make_project(epfl_datasets(epfl_replica.base_url(server.url)))
