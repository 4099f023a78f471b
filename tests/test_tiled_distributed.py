"""run_tiled on a Dask distributed cluster: the same output as one process; a lost worker costs only its blocks."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from emdata.access.tiling import run_tiled
from emdata.access.volume import Volume
from emdata.testing.volumes import coordinate_volume, write_canonical

distributed = pytest.importorskip("distributed")
# worker processes start an HTTP server each and say so when the default port is taken
SHAPE = (21, 37, 53)  # odd and non-cubic


def smooth(block: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(block.astype(np.float32), sigma)


def slow_smooth(block: np.ndarray, log: str, delay: float) -> np.ndarray:
    """The model of the lost-worker test: slow, and it logs every call with the worker's pid."""
    time.sleep(delay)
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return smooth(block)


def local_cluster(**options):
    return distributed.LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", scheduler_port=0,
                                    dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0", **options)


@pytest.fixture
def volume(tmp_path) -> Volume:
    return Volume(write_canonical(tmp_path / "in" / "v.h5", coordinate_volume(SHAPE, np.uint16)))


def read(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["prediction"][()], {k: str(v) for k, v in f["prediction"].attrs.items()}


@pytest.mark.parametrize("blend", ["crop", "average", "gaussian"])
def test_cluster_output_equals_one_process(volume, tmp_path, blend) -> None:
    kwargs = dict(block_shape=(8, 16, 16), halo=(2, 4, 4), blend=blend, dtype=np.float32)
    single = run_tiled(volume, smooth, tmp_path / "single.h5", **kwargs)
    with local_cluster(processes=False, protocol="tcp") as c, distributed.Client(c) as client:
        spread = run_tiled(volume, smooth, tmp_path / "cluster.h5", client=client, **kwargs)
    (a, attrs_a), (b, attrs_b) = read(single), read(spread)
    np.testing.assert_array_equal(a, b)
    assert attrs_a == attrs_b
    assert not (tmp_path / "cluster.h5.tiling.h5").exists()


def test_a_lost_worker_costs_only_its_blocks(volume, tmp_path) -> None:
    """Two worker processes; one is SIGKILLed once 4 blocks are done. The run finishes on the
    other (and the restarted) worker, recomputing only what the dead one held."""
    kwargs = dict(block_shape=(8, 16, 16), halo=(2, 4, 4), blend="crop", dtype=np.float32)
    blocks = 3 * 3 * 4
    expected, _ = read(run_tiled(volume, smooth, tmp_path / "single.h5", **kwargs))
    log = tmp_path / "calls.log"
    model = functools.partial(slow_smooth, log=str(log), delay=0.15)
    with local_cluster(processes=True) as c, distributed.Client(c) as client:
        pids = client.run(os.getpid)
        killed: list[int] = []

        def kill_one_worker() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if log.is_file() and len(log.read_text().splitlines()) >= 4:
                    victim = sorted(pids.values())[0]
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        out = run_tiled(volume, model, tmp_path / "cluster.h5", client=client, **kwargs)
        killer.join()
    assert killed, "no worker was killed"
    calls = [int(line) for line in log.read_text().splitlines()]
    assert killed[0] in calls and len(set(calls)) >= 2  # both workers worked; the victim did before dying
    assert blocks <= len(calls) <= blocks + 3, len(calls)  # at most the blocks the dead worker held run again
    got, _ = read(out)
    np.testing.assert_array_equal(got, expected)


def test_a_client_that_cannot_reach_workers_relays_through_the_scheduler(volume, tmp_path) -> None:
    """``direct_to_workers=False`` (a client behind a gateway) is kept: results come via the scheduler."""
    kwargs = dict(block_shape=(8, 16, 16), halo=(2, 4, 4), blend="crop", dtype=np.float32)
    expected, _ = read(run_tiled(volume, smooth, tmp_path / "single.h5", **kwargs))
    with local_cluster(processes=False, protocol="tcp") as c, \
            distributed.Client(c, direct_to_workers=False) as client:
        asked: list[bool] = []
        gather = client.gather
        client.gather = lambda futures, direct=None, **kw: asked.append(direct) or gather(futures, direct=direct, **kw)
        got, _ = read(run_tiled(volume, smooth, tmp_path / "cluster.h5", client=client, **kwargs))
    np.testing.assert_array_equal(got, expected)
    assert asked and set(asked) == {False}
