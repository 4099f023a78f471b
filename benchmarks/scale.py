"""Beyond one process: distributed normalize and tiled inference on Dask, ROI reads from the S3 remote.

One run measures, on generated data and loopback servers only::

    python benchmarks/scale.py                # all parts (about 10 minutes here)
    python benchmarks/scale.py --parts remote # or: normalize, tiled, remote, index

* normalize: ``normalize_dataset`` in one process vs ``scheduler=`` a ``LocalCluster`` of 2 worker
  processes (1 thread each), on a 256 x 512 x 512 uint8 EM-like TIFF, without compression and
  with zstd; the files must be byte-identical.
* tiled: ``run_tiled`` with a CPU-bound model (a 3D Gaussian filter, sigma 2, scipy) over that
  volume in 64 x 128 x 128 blocks with an 8-voxel halo, one process vs ``client=`` the same
  2-worker cluster, and vs 2 thread workers (``processes=False``); the outputs must be equal.
  Beside them, the ceiling of this machine: the same reads and model calls (no Dask, no output)
  in 1 vs 2 plain processes. Ratios are also given paired (runs back to back, median), because
  this VM's speed drifts by tens of percent between minutes.
* remote: a 1 GiB uint8 volume (1024^3, 64^3 chunks, no compression) and its chunk index are
  ``dvc add``-ed and pushed to SeaweedFS; a fresh clone then reads random 64^3 ROIs with
  ``open_dataset(..., remote="s3")`` (latency, bytes transferred) and one 256^3 ROI (throughput),
  against ``dvc pull`` of the whole file.
* index: a 1 TiB-class file (10240^3 uint8 in 64^3 chunks: 4,096,000 chunks, a sparse file) is
  opened through its chunk index and read (time, memory of that process); and its 62.5 MiB index,
  served by SeaweedFS, is opened remotely and one ROI's index pages are fetched (bytes).

Each part prints one JSON line; the numbers in benchmarks/README.md come from these. The machine
has 2 cores, so 2 workers can at best halve the time of a part whose work is all in the workers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
WORK = HERE / ".work" / "scale"


def log(part: str, **values) -> None:
    print(json.dumps({"part": part, **values}, sort_keys=False), flush=True)


def _cpu_fields() -> list[int]:
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat), steal excluded."""
    fields = _cpu_fields()
    return (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this VM wanted them (/proc/stat)."""
    return _cpu_fields()[7] / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its children (the worker processes), alive or reaped."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + ru.ru_utime + ru.ru_stime


def wait_quiet(limit: float = 0.3, patience: float = 30.0) -> float:
    """Wait until the rest of the machine uses below ``limit`` cores (over 2 s); return that load."""
    deadline = time.monotonic() + patience
    while True:
        busy, own, steal = busy_seconds(), own_seconds(), steal_seconds()
        time.sleep(2.0)
        load = max(0.0, (busy_seconds() - busy) - (own_seconds() - own) + (steal_seconds() - steal)) / 2.0
        if load < limit or time.monotonic() > deadline:
            return load


class Timed:
    """Wall seconds of a block, the cores other processes used meanwhile ("others"), and the
    cores the hypervisor took from this VM ("steal": on a shared host, a second busy core is
    often not fully ours)."""

    def __enter__(self) -> "Timed":
        self.before = wait_quiet()
        self.busy, self.own, self.steal0 = busy_seconds(), own_seconds(), steal_seconds()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t
        used = (busy_seconds() - self.busy) - (own_seconds() - self.own)
        self.others = max(0.0, used / self.seconds)
        self.steal = (steal_seconds() - self.steal0) / self.seconds


def cluster(processes: bool = True):
    from distributed import LocalCluster

    if not processes:  # workers are threads of this process, linked in memory (inproc://): no sockets
        return LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                            worker_dashboard_address=None)
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", scheduler_port=0,
                        dashboard_address=None, worker_dashboard_address=None)


def project(root: Path, shape: tuple[int, int, int], compression: str, stack: ExitStack):
    """A fetched project whose epfl_hippocampus is an EM-like TIFF of ``shape``."""
    import yaml

    from emdata.params.config import load_config
    from emdata.stages.fetch import fetch_dataset
    from emdata.testing.epfl import build_epfl_replica, epfl_datasets
    from emdata.testing.http_server import ReplicaServer

    replica = build_epfl_replica(root / "www", volume_shape=shape, coordinate=False)
    server = stack.enter_context(ReplicaServer(replica.root))
    (root / "p").mkdir(parents=True, exist_ok=True)
    (root / "p" / "params.yaml").write_text(yaml.safe_dump({
        "normalize": {"chunks": [64, 64, 64], "compression": compression, "compression_level": 3},
        "datasets": {"epfl_hippocampus": epfl_datasets(replica.base_url(server.url))["epfl_hippocampus"]}}))
    cfg = load_config(root / "p")
    fetch_dataset(cfg, "epfl_hippocampus")
    return cfg


def sha(path: Path) -> str:
    from emdata.core.digest import sha256_file

    return sha256_file(path)


def part_normalize(args) -> Path:
    from emdata.stages.normalize.volume import normalize_dataset

    shape = (256, 512, 512)
    out = None
    with ExitStack() as stack:
        c = stack.enter_context(cluster())
        for compression in ("none", "zstd"):
            cfg = project(WORK / f"normalize-{compression}", shape, compression, stack)
            normalize_dataset(cfg, "epfl_hippocampus")  # warm-up: numba kernel, page cache
            normalize_dataset(cfg, "epfl_hippocampus", scheduler=c.scheduler_address)  # warm workers
            times: dict[str, list] = {"single": [], "cluster": []}
            hashes = {}
            for _ in range(args.repeat):
                for mode in ("single", "cluster"):
                    with Timed() as run:
                        path = normalize_dataset(cfg, "epfl_hippocampus",
                                                 scheduler=c.scheduler_address if mode == "cluster" else None)
                    times[mode].append((run.seconds, run.others, run.steal))
                    hashes[mode] = sha(path)
            best = {k: min(v) for k, v in times.items()}
            mb = np.prod(shape) / 2**20
            log("normalize", compression=compression, shape=shape, mib=round(mb), single_s=round(best["single"][0], 2),
                cluster_2_workers_s=round(best["cluster"][0], 2),
                speedup=round(best["single"][0] / best["cluster"][0], 2), single_mib_s=round(mb / best["single"][0]),
                others_cores=[round(best["single"][1], 2), round(best["cluster"][1], 2)],
                steal_cores=[round(best["single"][2], 2), round(best["cluster"][2], 2)],
                identical=hashes["single"] == hashes["cluster"])
            if compression == "none":
                out = Path(path)
                shutil.copy(out, WORK / "tiled-input.h5")
    return WORK / "tiled-input.h5"


def gaussian(block: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(block.astype(np.float32), sigma)


TILED = dict(block_shape=(64, 128, 128), halo=(8, 8, 8), blend="crop", dtype=np.float32, model_id="gauss2")


def paired(times: dict[str, list], slow: str, fast: str) -> float:
    """Median over repeats of ``slow / fast`` for the two runs of the same repeat."""
    return round(float(np.median([a[0] / b[0] for a, b in zip(times[slow], times[fast])])), 2)


def bare_blocks(ids: list[int]) -> None:
    """The workers' share of tiled inference and nothing else: read, model, crop (no Dask, no output)."""
    from emdata.access.predict import predict_block
    from emdata.access.tiling import _crop_cast
    from emdata.access.volume import Volume

    volume = Volume(WORK / "tiled-input.h5")
    blocks = list(volume.blocks(TILED["block_shape"], halo=TILED["halo"]))
    model = functools.partial(gaussian, sigma=2.0)
    for i in ids:
        _crop_cast(blocks[i], predict_block(volume, model, blocks[i], "reflect"), np.dtype(np.float32))


def part_tiled(args) -> None:
    import multiprocessing

    import h5py
    from distributed import Client

    from emdata.access.tiling import run_tiled
    from emdata.access.volume import Volume

    source = WORK / "tiled-input.h5"
    if not source.is_file():
        part_normalize(args)
    volume = Volume(source)
    model = functools.partial(gaussian, sigma=2.0)
    n = len(list(volume.blocks(TILED["block_shape"], halo=TILED["halo"])))
    with ExitStack() as stack:
        clients = {"cluster": stack.enter_context(Client(stack.enter_context(cluster()))),
                   "threads": stack.enter_context(Client(stack.enter_context(cluster(processes=False))))}
        pool = stack.enter_context(multiprocessing.get_context("forkserver").Pool(2))
        for client in clients.values():
            client.run(lambda: __import__("scipy.ndimage"))  # imports are not the model's cost
        gaussian(np.zeros((8, 8, 8), np.float32), 2.0)
        pool.map(bare_blocks, [[0], [1]])
        times: dict[str, list] = {"single": [], "cluster": [], "threads": [], "bare_1": [], "bare_2": []}
        for _ in range(args.repeat):
            for mode in ("single", "cluster", "threads"):
                out = WORK / f"tiled-{mode}.h5"
                out.unlink(missing_ok=True)
                with Timed() as run:
                    run_tiled(volume, model, out, client=clients.get(mode), **TILED)
                times[mode].append((run.seconds, run.others, run.steal))
            # The ceiling on this machine: the same model calls in 1 vs 2 plain processes.
            with Timed() as run:
                pool.apply(bare_blocks, (list(range(n)),))
            times["bare_1"].append((run.seconds, run.others, run.steal))
            with Timed() as run:
                pool.map(bare_blocks, [list(range(0, n, 2)), list(range(1, n, 2))])
            times["bare_2"].append((run.seconds, run.others, run.steal))
    with h5py.File(WORK / "tiled-single.h5", "r") as a, h5py.File(WORK / "tiled-cluster.h5", "r") as b, \
            h5py.File(WORK / "tiled-threads.h5", "r") as c:
        equal = bool(np.array_equal(a["prediction"][()], b["prediction"][()])
                     and np.array_equal(a["prediction"][()], c["prediction"][()]))
    best = {k: min(v) for k, v in times.items()}
    log("tiled", shape=volume.shape, blocks=n, block=TILED["block_shape"], halo=TILED["halo"][0],
        model="gaussian_filter sigma 2", single_s=round(best["single"][0], 2),
        cluster_2_workers_s=round(best["cluster"][0], 2),
        speedup=round(best["single"][0] / best["cluster"][0], 2),
        others_cores=[round(best["single"][1], 2), round(best["cluster"][1], 2)],
        steal_cores=[round(best["single"][2], 2), round(best["cluster"][2], 2)], equal=equal,
        thread_workers_s=round(best["threads"][0], 2), thread_speedup=round(best["single"][0] / best["threads"][0], 2),
        bare_1_s=round(best["bare_1"][0], 2), bare_2_s=round(best["bare_2"][0], 2),
        bare_ceiling=round(best["bare_1"][0] / best["bare_2"][0], 2),
        # The machine's speed drifts between minutes: ratios of runs taken back to back, median.
        paired_speedup=paired(times, "single", "cluster"), paired_thread_speedup=paired(times, "single", "threads"),
        paired_bare_ceiling=paired(times, "bare_1", "bare_2"),
        runs={k: [round(t[0], 2) for t in v] for k, v in times.items()})


class NoiseVolume:
    """A deterministic uint8 volume made plane by plane (never held whole)."""

    def __new__(cls, shape):
        from emdata.formats.raw import RawVolume

        class _Noise(RawVolume):
            def __init__(self) -> None:
                self.shape, self.dtype, self.dataset = shape, np.dtype(np.uint8), "bench"
                self.voxel_size_nm, self.offset_nm = (8.0, 8.0, 8.0), (0.0, 0.0, 0.0)

            def read_box(self, start, stop):
                planes = [np.random.default_rng(z).integers(0, 256, shape[1:], np.uint8) for z in range(start[0], stop[0])]
                return np.stack(planes)[:, start[1]:stop[1], start[2]:stop[2]]

        return _Noise()


def big_file(folder: Path, name: str, shape) -> tuple[Path, Path]:
    """``data/processed/<name>.h5`` + ``data/metadata/<name>.chunks`` through the normalize writer."""
    import json as _json

    from emdata.h5 import chunk_index
    from emdata.h5 import hdf5
    from emdata.stages.normalize.volume import write_volume

    h5 = folder / "data" / "processed" / f"{name}.h5"
    index = folder / "data" / "metadata" / f"{name}.chunks"
    if h5.is_file() and index.is_file():
        return h5, index
    h5.parent.mkdir(parents=True, exist_ok=True)
    with hdf5.create(h5, name) as f:
        f.attrs["params"] = _json.dumps({"normalize": {"compression": "none", "compression_level": 3}})
        write_volume(f, "raw", NoiseVolume(shape), chunks=(64, 64, 64), compression="none", level=3,
                     attrs=hdf5.spatial_attrs((8.0, 8.0, 8.0), (0.0, 0.0, 0.0)), label=False, desc="bench")
    chunk_index.write(h5, index, file_name=h5.name, file_sha256=sha(h5))
    return h5, index


def part_remote(args) -> None:
    from emdata.access.open import open_dataset
    from emdata.testing.dvc import dvc, git, offline_env
    from emdata.testing.s3 import SeaweedS3

    base = Path(tempfile.mkdtemp(prefix="emdata-scale-", dir=WORK))
    env = offline_env(base / "env")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
              "AWS_EC2_METADATA_DISABLED", "DVC_NO_ANALYTICS", "DVC_SITE_CACHE_DIR", "DVC_GLOBAL_CONFIG_DIR",
              "DVC_SYSTEM_CONFIG_DIR"):
        os.environ[k] = env[k]
    try:
        with SeaweedS3(base / "s3", access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"]) as s3:
            s3.create_bucket("emdata-dvc")
            repo = base / "producer"
            repo.mkdir()
            t = time.perf_counter()
            h5, index = big_file(WORK / "bigfile", "big", (1024, 1024, 1024))
            made = time.perf_counter() - t
            (repo / "data" / "processed").mkdir(parents=True)
            (repo / "data" / "metadata").mkdir(parents=True)
            os.link(h5, repo / "data" / "processed" / "big.h5")
            shutil.copy(index, repo / "data" / "metadata" / "big.chunks")
            git(["init", "-q", "-b", "main"], repo, env)
            dvc(["init", "-q"], repo, env)
            dvc(["config", "core.analytics", "false"], repo, env)
            dvc(["remote", "add", "-d", "s3", "s3://emdata-dvc/cache"], repo, env)
            dvc(["remote", "modify", "s3", "region", "us-east-1"], repo, env)
            dvc(["remote", "modify", "--local", "s3", "endpointurl", s3.endpoint], repo, env)
            dvc(["add", "data/processed/big.h5", "data/metadata/big.chunks"], repo, env)
            t = time.perf_counter()
            dvc(["push", "-r", "s3"], repo, env)
            pushed = time.perf_counter() - t
            git(["add", "-A"], repo, env)
            git(["commit", "-qm", "big"], repo, env)
            clone = base / "clone"
            git(["clone", "-q", str(repo), str(clone)], base, env)
            dvc(["remote", "modify", "--local", "s3", "endpointurl", s3.endpoint], clone, env)
            t = time.perf_counter()
            dvc(["pull", "-r", "s3", "data/processed/big.h5"], clone, env)
            pulled = time.perf_counter() - t
            size = (clone / "data" / "processed" / "big.h5").stat().st_size
            t = time.perf_counter()
            vol = open_dataset("big", repo=clone, rev="HEAD", remote="s3")
            opened = time.perf_counter() - t
            open_bytes = vol.transfer.bytes
            rng = np.random.default_rng(0)
            latencies, sizes, reqs = [], [], []
            with open(clone / "data" / "processed" / "big.h5", "rb"):
                pass
            from emdata.access.volume import Volume

            local = Volume(clone / "data" / "processed" / "big.h5")
            for _ in range(args.rois):
                start = [int(rng.integers(0, 1024 - 64)) for _ in range(3)]
                vol.transfer.reset()
                t = time.perf_counter()
                got = vol.read(start, (64, 64, 64))
                latencies.append(time.perf_counter() - t)
                sizes.append(vol.transfer.bytes)
                reqs.append(vol.transfer.requests)
                assert np.array_equal(got, local.read(start, (64, 64, 64)))
            vol.transfer.reset()
            t = time.perf_counter()
            big = vol.read((384, 384, 384), (256, 256, 256))
            big_s = time.perf_counter() - t
            assert np.array_equal(big, local.read((384, 384, 384), (256, 256, 256)))
            lat = np.array(latencies) * 1000
            log("remote", file_gib=round(size / 2**30, 3), write_s=round(made, 1), push_s=round(pushed, 1),
                dvc_pull_s=round(pulled, 2), dvc_pull_mib_s=round(size / 2**20 / pulled),
                open_s=round(opened, 3), open_bytes=open_bytes, rois=args.rois,
                roi64_ms_p50=round(float(np.percentile(lat, 50)), 1), roi64_ms_p95=round(float(np.percentile(lat, 95)), 1),
                roi64_bytes_max=int(max(sizes)), roi64_bytes_mean=int(np.mean(sizes)),
                roi64_chunk_bytes_touched_max=8 * 64**3, roi64_requests_max=int(max(reqs)),
                roi256_s=round(big_s, 3), roi256_mib_s=round(vol.transfer.bytes / 2**20 / big_s),
                roi256_bytes=vol.transfer.bytes, roi256_requests=vol.transfer.requests,
                first_roi_vs_pull=round(pulled / (opened + latencies[0]), 1))
    finally:
        shutil.rmtree(base, ignore_errors=True)


OPEN_AND_READ = """
import json, resource, sys, time
import numpy as np
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()
from emdata.access.volume import Volume
import h5py, hdf5plugin
before = rss()
t = time.perf_counter()
vol = Volume(sys.argv[1], index=sys.argv[2])
a = vol.read((5000, 6000, 7000), (64, 64, 64))
opened = time.perf_counter() - t
t = time.perf_counter()
for k in range(20):
    vol.read((400 * k, 300 * k, 200 * k), (100, 100, 100))
reads = (time.perf_counter() - t) / 20
print(json.dumps({"open_and_first_read_s": opened, "read_100cubed_s": reads, "rss_growth_mib": (rss() - before) / 2**20,
                  "fast_path": vol._open().chunkmap is not None}))
"""


def part_index(args) -> None:
    import h5py

    from emdata.h5 import chunk_index
    from emdata.access.remote import RangeReader, RemoteIndex, Transfer
    from emdata.h5 import hdf5
    from emdata.testing.s3 import SeaweedS3

    n = 10240
    folder = WORK / "tib"
    folder.mkdir(parents=True, exist_ok=True)
    h5, index = folder / "tib.h5", folder / "tib.chunks"
    t = time.perf_counter()
    if not (h5.is_file() and index.is_file()):
        with h5py.File(h5, "w") as f:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk((64, 64, 64))
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            h5py.h5d.create(f.id, b"raw", h5py.h5t.STD_U8LE, h5py.h5s.create_simple((n, n, n)), dcpl=dcpl)
            f["raw"].attrs.update(hdf5.spatial_attrs((8.0, 8.0, 8.0), (0.0, 0.0, 0.0)))
            f["raw"].attrs["array_sha256"] = "0" * 64
        created = time.perf_counter() - t
        t = time.perf_counter()
        chunk_index.write(h5, index, file_name=h5.name, file_sha256="sparse benchmark file")
        indexed = time.perf_counter() - t
    else:
        created = indexed = float("nan")
    out = subprocess.run([sys.executable, "-c", OPEN_AND_READ, str(h5), str(index)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src"))).stdout
    local = json.loads(out)
    with SeaweedS3(Path(tempfile.mkdtemp(prefix="tib-s3-", dir=WORK))) as s3:
        s3.create_bucket("idx")
        s3.client().upload_file(str(index), "idx", "tib.chunks")
        import s3fs

        fs = s3fs.S3FileSystem(anon=True, client_kwargs={"endpoint_url": s3.endpoint, "region_name": "us-east-1"})
        transfer = Transfer()
        reader = RangeReader(fs, "idx/tib.chunks", index.stat().st_size, "s3://idx/tib.chunks", "tib", transfer)
        t = time.perf_counter()
        remote = RemoteIndex(reader)
        opened = time.perf_counter() - t
        open_bytes = transfer.bytes
        a = remote.index.arrays["raw"]
        ks = [(kz, ky, kx) for kz in (78, 79) for ky in (93, 94) for kx in (109, 110)]  # one unaligned 64^3 ROI
        t = time.perf_counter()
        rows = remote.rows(a, np.array([a.flat(k) for k in ks]))
        paged = time.perf_counter() - t
        local_rows = chunk_index.ChunkIndex.open(index).table("raw")[[a.flat(k) for k in ks]]
        assert np.array_equal(rows, local_rows)
    log("index", shape=(n, n, n), chunks=int(np.prod(a.grid)), apparent_tib=round(h5.stat().st_size / 2**40, 3),
        allocated_mib=round(h5.stat().st_blocks * 512 / 2**20), create_s=round(created, 1), index_s=round(indexed, 1),
        index_mib=round(index.stat().st_size / 2**20, 1), local=local, remote_open_s=round(opened, 3),
        remote_open_bytes=open_bytes, remote_roi_index_s=round(paged, 3),
        remote_roi_index_bytes=transfer.bytes - open_bytes, peak_rss_mib_this_process=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="normalize,tiled,remote,index")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rois", type=int, default=50)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    for part in args.parts.split(","):
        {"normalize": part_normalize, "tiled": part_tiled, "remote": part_remote, "index": part_index}[part](args)


if __name__ == "__main__":
    main()
