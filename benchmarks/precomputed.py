"""Peak memory of `emdata fetch` and `emdata normalize` for a 1000^3 precomputed crop.

A generated precomputed layer at full crop size is served on loopback by the replica's HTTP
server (emdata.testing.http_server), as the hemibrain EM is served: JPEG, 64^3 chunks, sharded
(``neuroglancer_uint64_sharded_v1``), 1088^3 voxels at 8 nm with a non-zero ``voxel_offset``,
plus a raw 64 nm scale for the tissue screening. It is written by tensorstore, slab by slab,
into ``--workdir`` and kept for the next run. Then, each as its own process, as ``dvc repro``
runs them::

    python -m emdata -q fetch bench        # seeded search, then 1000^3 voxels decoded block by block
    python -m emdata -q normalize bench    # the local crop -> HDF5 (64^3 chunks, no compression)

Peak RSS is the child's ``ru_maxrss`` (with its anonymous and file-backed parts sampled from
/proc); the target is below 0.6x the crop's bytes (1000^3 uint8 = 1e9 B -> 600 MB). Linux carries
the parent's peak RSS into a child's ``ru_maxrss`` across fork + exec, so this process stays small
while the children run: the layer is generated, and the output verified, in other processes. The output is
verified: the record's ``array_sha256`` must equal a sha256 computed here over the same crop
decoded by tensorstore straight from the layer's files, slab by slab.

Download speed is not measured: a Python-served loopback HTTP server measures the server, not
the client (TOOLING.md). The wall times are printed for orientation only::

    python benchmarks/precomputed.py
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CROP = (1000, 1000, 1000)
SIZE = (1088, 1088, 1088)  # z, y, x at 8 nm: room for 2 chunk-grid positions per axis
OFFSET = (64, 128, 192)
LAYER = "bucket/emdata/bench/jpeg"
SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": 3,
            "minishard_bits": 3, "shard_bits": 9, "minishard_index_encoding": "gzip", "data_encoding": "raw"}
LIMIT = 0.6 * np.prod(CROP)  # bytes


def _bench_normalize():
    spec = importlib.util.spec_from_file_location("bench_normalize", HERE / "normalize.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["bench_normalize"] = module
    spec.loader.exec_module(module)
    return module


def em_slab(z0: int, z1: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """EM-like uint8 voxels (smooth structure and noise, 1..255: all of it is tissue)."""
    rng = np.random.default_rng([seed, z0])
    _, height, width = shape
    yy = np.arange(height)[:, None] / height
    xx = np.arange(width)[None, :] / width
    out = np.empty((z1 - z0, height, width), np.uint8)
    for i, z in enumerate(range(z0, z1)):
        base = 128 + 60 * np.sin(12 * xx + z / 40) * np.cos(9 * yy - z / 55)
        out[i] = np.clip(base + rng.normal(0, 25, (height, width)), 1, 255)
    return out


def make_layer(folder: Path) -> None:
    """The layer, written by tensorstore in shard-aligned slabs (a sharded write is whole shards)."""
    import tensorstore as ts

    if (folder / "info").is_file():
        return
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    coarse = tuple(-(-n // 8) for n in SIZE)
    info = {"@type": "neuroglancer_multiscale_volume", "type": "image", "data_type": "uint8", "num_channels": 1,
            "scales": [{"key": "8.0x8.0x8.0", "resolution": [8.0, 8.0, 8.0], "size": list(SIZE[::-1]),
                        "voxel_offset": list(OFFSET[::-1]), "chunk_sizes": [[64, 64, 64]], "encoding": "jpeg",
                        "sharding": SHARDING},
                       {"key": "64.0x64.0x64.0", "resolution": [64.0, 64.0, 64.0], "size": list(coarse[::-1]),
                        "voxel_offset": [o // 8 for o in OFFSET[::-1]], "chunk_sizes": [[64, 64, 64]],
                        "encoding": "raw"}]}
    (tmp / "info").write_text(json.dumps(info))
    started = time.perf_counter()
    for index, (shape, step) in enumerate(((SIZE, 256), (coarse, 64))):
        store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": index,
                         "kvstore": {"driver": "file", "path": str(tmp) + "/"}}, open=True).result()
        view = store[ts.d["channel"][0]][ts.d["z", "y", "x"].transpose[0, 1, 2]].translate_to[0, 0, 0]
        for z0 in range(0, shape[0], step):
            z1 = min(shape[0], z0 + step)
            view[z0:z1].write(em_slab(z0, z1, shape, index)).result()
    tmp.rename(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"layer written in {time.perf_counter() - started:.0f} s: {size / 2**20:.0f} MiB on disk", flush=True)


def crop_sha256(folder: Path, start: list[int]) -> str:
    """sha256 of the crop's voxels in C order, decoded by tensorstore from the files, 64 planes at a time."""
    import tensorstore as ts

    store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": 0,
                     "kvstore": {"driver": "file", "path": str(folder) + "/"}}, read=True).result()
    view = store[ts.d["channel"][0]][ts.d["z", "y", "x"].transpose[0, 1, 2]]
    digest = hashlib.sha256()
    z, y, x = start
    for z0 in range(z, z + CROP[0], 64):
        z1 = min(z + CROP[0], z0 + 64)
        digest.update(np.ascontiguousarray(view[z0:z1, y:y + CROP[1], x:x + CROP[2]].read().result()).data)
    return digest.hexdigest()


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "precomputed")
    parser.add_argument("--step", choices=("all", "generate", "verify"), default="all", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir.resolve()
    layer = work / "www" / LAYER
    if args.step == "generate":
        return make_layer(layer)
    if args.step == "verify":
        return print(crop_sha256(layer, args.start))
    import subprocess

    import yaml

    from emdata.testing.http_server import ReplicaServer

    bench = _bench_normalize()
    me = [sys.executable, __file__, "--workdir", str(work)]
    subprocess.run([*me, "--step", "generate"], check=True)
    project = work / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    print(f"this process: {_rss_mib():.0f} MiB (a child's ru_maxrss is at least this)", flush=True)
    with ReplicaServer(work / "www") as server:
        source = {"kind": "precomputed", "url": f"{server.url}/{LAYER}", "scale": 8, "crop_size": list(CROP),
                  "seed": 0}
        params = {"normalize": {"chunks": [64, 64, 64], "compression": "none"},
                  "datasets": {"bench": {"title": "precomputed benchmark", "license": "-", "citation": "-",
                                         "modality": "FIB-SEM", "source": source}}}
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        fetch = bench.run([sys.executable, "-m", "emdata", "-q", "fetch", "bench"], project)
        requests = len(server.requests)
    normalize = bench.run([sys.executable, "-m", "emdata", "-q", "normalize", "bench"], project)
    raw = project / "data" / "raw" / "bench"
    extra = json.loads((raw / "source.json").read_text())["extra"]
    record = json.loads((project / "data" / "metadata" / "bench.json").read_text())
    expected = subprocess.run([*me, "--step", "verify", "--start", *map(str, extra["roi"]["start_zyx"])],
                              check=True, capture_output=True, text=True).stdout.strip()
    raw_bytes = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    print(f"crop {extra['roi']['start_zyx']}..{extra['roi']['stop_zyx']} (z, y, x), tries {extra['search']['tries']}; "
          f"{len(list((raw / 'crop.zarr').iterdir())) - 1} blocks of {extra['store']['block_zyx']}, "
          f"{raw_bytes / 2**20:.0f} MiB raw; {requests} HTTP requests")
    ok = True
    for name, r in (("fetch", fetch), ("normalize", normalize)):
        holds = r.rss < LIMIT
        ok &= holds
        print(f"{name:<9} peak RSS {r.rss / 2**20:6.0f} MiB (sampled: anon {r.anon / 2**20:.0f}, file {r.file / 2**20:.0f}) = "
              f"{r.rss / np.prod(CROP):.2f}x the crop: {'holds' if holds else 'MISSED'} (< 0.6x = {LIMIT / 2**20:.0f} MiB); "
              f"{r.seconds:.1f} s, CPU {r.cpu:.1f} s, others {r.others / max(r.seconds, 1e-9):.2f} cores")
    same = record["array_sha256"] == expected and record["shape"] == list(CROP)
    print(f"verified: record shape {record['shape']}, array_sha256 {'equals' if same else 'DIFFERS FROM'} the sha256 "
          "of the crop decoded from the layer's files")
    if not (ok and same):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
