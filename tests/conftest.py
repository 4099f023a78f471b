"""Shared fixtures: loopback replicas, throw-away projects, an offline environment for DVC."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from emdata.params.config import Config, load_config
from emdata.testing.epfl import EpflReplica, build_epfl_replica, epfl_datasets
from emdata.testing.http_server import ReplicaServer

REPO = Path(__file__).resolve().parents[1]

# -- tiers: `make test-fast` runs `-m "not slow"`, `make test` everything ------------------------
# The one place that says which tests are slow. Slow: whatever runs `dvc`, S3 (SeaweedFS), Dask
# clusters, the fault matrix, disk-full mounts, the README and demo walk-throughs, and tests that
# spend their time in `python -m emdata` subprocesses. Every src module keeps fast tests of its own.
SLOW_MODULES = {
    "test_fault_matrix",  # ~40 end-to-end CLI cases, kill -9, tmpfs mounts
    "test_disk_full",  # tmpfs mounts, CLI subprocesses
    "test_dvc_pipeline", "test_readme", "test_plugin_source", "test_remote_access",  # dvc + S3
    "test_tiled_distributed",  # Dask LocalClusters in every test
    "test_light_install",  # builds a wheel and a fresh venv
}
SLOW_MARKERS = {"dvc", "s3"}
SLOW_FIXTURES = {"cluster"}  # a Dask LocalCluster
SLOW_TESTS = {  # (module, test name without parameters): subprocess- or worker-heavy tests of fast modules
    ("test_contract", "test_404_is_one_line_error_naming_dataset_and_url"),  # the CLI, once per kind
    ("test_contract", "test_a_missing_path_is_one_line_naming_dataset_and_path"),
    ("test_source_lightmycells", "test_a_corrupt_ome_xml_is_one_line_and_leaves_the_last_outputs"),
    ("test_source_labelme_tracking", "test_inputs_stage_records_the_files_and_says_when_they_are_missing"),
    ("test_source_labelme_tracking", "test_a_bad_labelme_file_is_one_line_naming_it_and_the_last_import_stays"),
    ("test_source_precomputed", "test_an_unreachable_base_url_fails_in_one_line_after_few_attempts"),
    ("test_source_empiar", "test_failures_are_one_line_and_leave_outputs_untouched"),
    ("test_torch", "test_dataloader_with_spawned_workers_matches_one_process"),
    ("test_collection_access", "test_paired_patches_with_two_dataloader_workers_equal_one_process"),
    ("test_tiling", "test_torch_modules_are_identified_by_their_weights"),
    ("test_chunk_index", "test_a_large_sparse_file_opens_without_walking_its_chunks"),
    ("test_normalize_distributed", "test_killed_worker_and_killed_client"),  # worker processes, kill -9
    ("test_access_trust", "test_set_epoch_reaches_persistent_workers"),  # DataLoader worker processes
    ("test_access_api", "test_type_checkers_see_the_public_api"),  # mypy: ~30 s without its cache
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        name = getattr(item, "originalname", item.name)
        if (module in SLOW_MODULES or SLOW_MARKERS & {m.name for m in item.iter_markers()}
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or (module, name) in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


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
