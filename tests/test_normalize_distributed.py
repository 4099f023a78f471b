"""normalize on a Dask distributed cluster: the same bytes as one process, resumable from its ledger.

A ``distributed.LocalCluster`` on loopback stands in for a cluster: threads (fast) for the byte
comparisons, two worker processes for the test that kills a worker and then the client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from emdata.h5.chunk_index import ChunkIndex
from emdata.params.config import load_config
from emdata.errors import ClusterError
from emdata.core.digest import sha256_file
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.normalize.ledger import Ledger, last_ledger_path, ledger_dir
from emdata.stages.normalize.ledger import pack_block as _pack_block
from emdata.stages.normalize.ledger import unpack_block as _unpack_block
from emdata.stages.fetch import fetch_dataset
from emdata.testing.epfl import build_epfl_replica, epfl_datasets
from emdata.testing.http_server import ReplicaServer

distributed = pytest.importorskip("distributed")
# worker processes start an HTTP server each and say so when the default port is taken


def local_cluster(**options):
    """A loopback-only LocalCluster without a dashboard."""
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", scheduler_port=0,
                                    dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0", **options)


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(processes=False, protocol="tcp") as c:
        yield c


def outputs(cfg, key: str) -> dict[str, str]:
    """sha256 of everything normalize publishes for ``key``."""
    return {"h5": sha256_file(cfg.processed_path(key)), "record": sha256_file(cfg.record_path(key)),
            "index": sha256_file(cfg.record_path(key).with_suffix(".chunks"))}


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc-lz4"])
def test_distributed_file_is_byte_identical(make_project, server, epfl_replica, cluster, compression) -> None:
    """Image and labels, odd shapes, each compression: the same HDF5, record and chunk index bytes."""
    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)),
                       normalize={"chunks": [8, 16, 16], "compression": compression, "compression_level": 5})
    for key in ("epfl_hippocampus", "epfl_mito_train"):
        fetch_dataset(cfg, key)
        normalize_dataset(cfg, key)
        single = outputs(cfg, key)
        normalize_dataset(cfg, key, scheduler=cluster.scheduler_address)
        assert outputs(cfg, key) == single, key
        assert not ledger_dir(cfg, key).exists()  # staged tiles are gone once published
        log = [json.loads(line) for line in last_ledger_path(cfg, key).read_text().splitlines()[1:]]
        arrays = {"raw"} | ({"labels/mitochondria"} if key == "epfl_mito_train" else set())
        assert {e["array"] for e in log} == arrays and len({(e["array"], e["tile"]) for e in log}) == len(log)
        assert {e["worker"] for e in log} <= {w for w in cluster.scheduler_info["workers"]}
    with h5py.File(cfg.processed_path("epfl_mito_train"), "r") as f:
        np.testing.assert_array_equal(f["raw"][()], epfl_replica.arrays["training.tif"])
        assert f["label_stats/mitochondria/chunk_foreground"][()].sum() == \
            np.count_nonzero(epfl_replica.arrays["training_groundtruth.tif"])


def test_tiles_smaller_than_a_slab_give_the_same_file(make_project, server, epfl_replica, cluster) -> None:
    """A budget of one chunk per tile: band tiles and a separate C-order pass for the sha256."""
    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)),
                       normalize={"chunks": [8, 16, 16], "compression": "zstd"})
    fetch_dataset(cfg, "epfl_mito_train")
    tiny = dataclasses.replace(cfg, normalize=dataclasses.replace(cfg.normalize, memory_budget_mb=0))
    normalize_dataset(cfg, "epfl_mito_train")
    reference = outputs(cfg, "epfl_mito_train")
    normalize_dataset(tiny, "epfl_mito_train")
    assert outputs(cfg, "epfl_mito_train") == reference  # the budget does not change bytes
    normalize_dataset(tiny, "epfl_mito_train", scheduler=cluster.scheduler_address)
    assert outputs(cfg, "epfl_mito_train") == reference
    log = last_ledger_path(cfg, "epfl_mito_train").read_text().splitlines()[1:]
    assert len(log) == 2 * 3 * 2 * 3  # raw + labels, one 8x16x16 chunk each over a 17x29x43 grid


def test_interrupted_client_resumes_from_the_ledger(make_project, server, epfl_replica, cluster, monkeypatch) -> None:
    """The client stops after 5 tiles; the rerun encodes only the others and places all of them."""

    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)), normalize={"chunks": [4, 16, 16]})
    key = "epfl_hippocampus"
    fetch_dataset(cfg, key)
    normalize_dataset(cfg, key)
    single = outputs(cfg, key)
    original = Ledger.stage
    calls = []

    def stage_then_die(self, array, tile, result):
        if len(calls) == 5:
            raise KeyboardInterrupt("the client process is killed")
        calls.append(tile)
        original(self, array, tile, result)

    monkeypatch.setattr(Ledger, "stage", stage_then_die)
    with pytest.raises((ClusterError, KeyboardInterrupt)):
        normalize_dataset(cfg, key, scheduler=cluster.scheduler_address)
    monkeypatch.setattr(Ledger, "stage", original)
    first = [json.loads(line) for line in (ledger_dir(cfg, key) / "ledger.jsonl").read_text().splitlines()[1:]]
    assert len(first) == 5 and outputs(cfg, key) == single  # the published output was not touched
    normalize_dataset(cfg, key, scheduler=cluster.scheduler_address)
    assert outputs(cfg, key) == single
    log = [json.loads(line) for line in last_ledger_path(cfg, key).read_text().splitlines()[1:]]
    tiles = [e["tile"] for e in log]
    assert sorted(tiles) == list(range(6)) and len(set(tiles)) == len(tiles)  # 21 slices / 4: no tile twice
    assert [e["tile"] for e in log if e["run"] == first[0]["run"]] == [e["tile"] for e in first]
    assert len({e["run"] for e in log}) == 2


def test_a_changed_setting_discards_the_ledger(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l", "fingerprint-a")
    result = {"chunks": [((0, 0, 0), 0, b"abc")], "stats": {"n": 3, "hist": np.arange(256)},
              "foreground": None, "worker": "w", "seconds": 0.1}
    ledger.stage("raw", 0, result)
    assert (("raw", 0) in Ledger(tmp_path / "l", "fingerprint-a").done)
    assert Ledger(tmp_path / "l", "fingerprint-b").done == {}
    back = _unpack_block(_pack_block(result))
    assert back["chunks"][0].data == b"abc" and back["stats"]["hist"].tolist() == list(range(256))


def test_an_unreachable_scheduler_is_one_line(make_project, server, epfl_replica, tmp_path) -> None:
    cfg = make_project(epfl_datasets(epfl_replica.base_url(server.url)))
    fetch_dataset(cfg, "epfl_hippocampus")
    # the discard port: nobody listens
    env = dict(os.environ, EMDATA_SCHEDULER="tcp://127.0.0.1:9", EMDATA_SCHEDULER_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "emdata", "-C", str(cfg.root), "normalize", "epfl_hippocampus"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 11, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("emdata: error:")]
    assert len(lines) == 1 and "cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'" in lines[0]
    assert "Traceback" not in proc.stderr and not cfg.processed_path("epfl_hippocampus").exists()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _ledger_lines(cfg, key) -> list[dict]:
    path = ledger_dir(cfg, key) / "ledger.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()[1:] if line.endswith("}")]


def test_killed_worker_and_killed_client(tmp_path) -> None:
    """Two worker processes: one is SIGKILLed mid-run, then the client (the CLI) is SIGKILLed; the
    rerun (through EMDATA_SCHEDULER) finishes from the ledger, no tile is encoded twice, and the
    file equals the single-process one."""
    replica = build_epfl_replica(tmp_path / "www", volume_shape=(96, 96, 112), coordinate=False)
    with ReplicaServer(replica.root) as srv:
        root = tmp_path / "project"
        root.mkdir()
        import yaml

        (root / "params.yaml").write_text(yaml.safe_dump({
            "normalize": {"chunks": [2, 32, 32], "compression": "zstd", "compression_level": 19},
            "datasets": {"epfl_hippocampus": epfl_datasets(replica.base_url(srv.url))["epfl_hippocampus"]}}))
        cfg = load_config(root)
        key = "epfl_hippocampus"
        fetch_dataset(cfg, key)
    tiles = 96 // 2
    normalize_dataset(cfg, key)
    single = outputs(cfg, key)
    cfg.processed_path(key).unlink()
    with local_cluster(processes=True) as c, distributed.Client(c) as client:
        pids = client.run(os.getpid)
        env = dict(os.environ, EMDATA_SCHEDULER=c.scheduler_address)
        cmd = [sys.executable, "-m", "emdata", "-C", str(root), "normalize", key]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: len(_ledger_lines(cfg, key)) >= 3, 120, "3 staged tiles")
            victim = sorted(pids)[0]
            os.kill(pids[victim], signal.SIGKILL)  # a worker dies mid-run; Dask reruns its tiles elsewhere
            killed_at = len(_ledger_lines(cfg, key))
            _wait(lambda: len(_ledger_lines(cfg, key)) >= killed_at + 4, 120, "progress after the worker died")
            proc.send_signal(signal.SIGKILL)  # then the client dies
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        first = _ledger_lines(cfg, key)
        assert killed_at + 4 <= len(first) < tiles, "the first run must stop part-way"
        assert not cfg.processed_path(key).exists()
        assert victim not in {e["worker"] for e in first[killed_at + 1:]}  # the killed worker staged no more
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{tiles - len(first)} of {tiles} tiles to encode" in rerun.stderr
    assert outputs(cfg, key) == single
    log = [json.loads(line) for line in last_ledger_path(cfg, key).read_text().splitlines()[1:]]
    assert sorted(e["tile"] for e in log) == list(range(tiles))  # every tile exactly once, over both runs
    assert [e["tile"] for e in log[:len(first)]] == [e["tile"] for e in first]
    assert len({e["run"] for e in log}) == 2
    assert ChunkIndex.open(cfg.record_path(key).with_suffix(".chunks")).file["sha256"] == single["h5"]
    assert hashlib.sha256(cfg.processed_path(key).read_bytes()).hexdigest() == single["h5"]
