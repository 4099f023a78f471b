"""Peak RSS of `emdata normalize empiar_11759` on the real shape, 16 x 5500 x 5496 uint8 (generated).

The 16 DM3 slices (30 MB each, written by the replica's DM3 writer one slice at a time, with the
real tag structure) are served by the EMPIAR replica on loopback and fetched with
`python -m emdata fetch`, as the pipeline does; then `python -m emdata normalize` runs as a
child process whose peak RSS (``ru_maxrss`` from ``os.wait4``, with its anonymous and
file-backed parts sampled from /proc) must stay under 400 MB. The stack is 484 MB: a reader that
held it, or one slab of it, could not. The output is verified: the record's shape, resolution and
``array_sha256`` (against a sha256 of the generated slices computed here, in order)::

    python benchmarks/empiar_rss.py                  # default memory budget (params: 256 MB)
    python benchmarks/empiar_rss.py --budget 128     # another normalize.memory_budget_mb

Working files (about 1.5 GB: served slices, fetched slices, HDF5) go to ``--workdir``
(default benchmarks/.work/empiar) and are reused by the next run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from normalize import run  # noqa: E402  (the sibling benchmark's child-process measurement)

REAL_SHAPE = (16, 5500, 5496)
LIMIT = 400 * 10**6
MIB = 1 << 20
KEY = "empiar_11759"


def em_slice(z: int, shape: tuple[int, int]) -> np.ndarray:
    """An EM-like uint8 section (smooth structure plus noise), generated row band by row band."""
    rng = np.random.default_rng(z)
    height, width = shape
    out = np.empty(shape, np.uint8)
    xs = np.sin(np.linspace(0, 40, width, dtype=np.float32))
    for y0 in range(0, height, 500):
        ys = np.cos(np.linspace(0, 40, height, dtype=np.float32)[y0:y0 + 500])[:, None]
        band = 128 + 40 * ys * xs + 8 * np.sin(z / 3) + rng.normal(0, 18, (len(ys), width)).astype(np.float32)
        out[y0:y0 + len(ys)] = np.clip(band, 0, 255)
    return out


def generate(folder: Path, shape: tuple[int, int, int]) -> str:
    """Write the slices once (reused later); return the sha256 of the voxels in C order."""
    from emdata.testing.empiar import build_empiar_replica

    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text())["shape"] == list(shape):
        return json.loads(done.read_text())["sha256"]
    digest = hashlib.sha256()

    def make(z: int) -> np.ndarray:
        image = em_slice(z, shape[1:])
        digest.update(image.tobytes())
        return image

    start = time.perf_counter()
    build_empiar_replica(folder / "www", shape=shape, make_slice=make, keep=False)
    done.write_text(json.dumps({"shape": list(shape), "sha256": digest.hexdigest()}))
    print(f"generated {shape[0]} DM3 slices of {shape[1]} x {shape[2]} in {time.perf_counter() - start:.0f} s",
          flush=True)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work" / "empiar")
    parser.add_argument("--shape", type=int, nargs=3, default=REAL_SHAPE)
    parser.add_argument("--budget", type=int, default=None, help="normalize.memory_budget_mb (default: params')")
    args = parser.parse_args()
    shape = tuple(args.shape)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    expected = generate(work, shape)

    from emdata.testing.empiar import EmpiarReplica, RunningEmpiar, empiar_dataset
    from emdata.testing.http_server import ReplicaServer

    replica = EmpiarReplica(work / "www", shape, names=[])
    project = work / "project"
    project.mkdir(exist_ok=True)
    with ReplicaServer(replica.root) as server:
        RunningEmpiar(replica, server)  # answers the EMPIAR API route on the server
        normalize = {"chunks": [64, 64, 64], "compression": "none"}
        if args.budget:
            normalize["memory_budget_mb"] = args.budget
        params = {"normalize": normalize, "datasets": {KEY: empiar_dataset(server.url)}}
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "emdata", "-q", "fetch", KEY], cwd=project, check=True)
        print(f"fetch from the loopback replica: {time.perf_counter() - start:.1f} s", flush=True)
    for out in (project / "data" / "processed" / f"{KEY}.h5", project / "data" / "metadata" / f"{KEY}.json"):
        out.unlink(missing_ok=True)
    result = run([sys.executable, "-m", "emdata", "-q", "normalize", KEY], project)
    record = json.loads((project / "data" / "metadata" / f"{KEY}.json").read_text())
    problems = []
    if record["shape"] != list(shape):
        problems.append(f"record shape {record['shape']} != {list(shape)}")
    if record["array_sha256"] != expected:
        problems.append("array_sha256 differs from the sha256 of the generated slices")
    if not np.allclose(record["voxel_size_nm"], [50.0, 7.99825, 7.99825], rtol=1e-6):
        problems.append(f"resolution {record['voxel_size_nm']}")
    volume = int(np.prod(shape))
    print(f"normalize {KEY} {'x'.join(map(str, shape))} ({volume / 1e6:.0f} MB): {result.seconds:.1f} s, "
          f"{volume / result.seconds / 1e6:.0f} MB/s, CPU {result.cpu:.1f} s, others {result.others:.2f} cores")
    print(f"peak RSS {result.rss / MIB:.0f} MiB ({result.rss / 1e6:.0f} MB; RssAnon {result.anon / MIB:.0f} MiB, "
          f"RssFile {result.file / MIB:.0f} MiB); limit {LIMIT / 1e6:.0f} MB: "
          f"{'ok' if result.rss < LIMIT else 'OVER'}")
    print("output verified (shape, resolution, array_sha256)" if not problems else "OUTPUT WRONG: " + "; ".join(problems))
    if problems or result.rss >= LIMIT:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
