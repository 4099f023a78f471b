"""IDR: the render route (PNG tiles from render_image_region) against the original-file route.

Both routes of source kind ``idr`` run against the IDR replica (``emdata.testing.idr``), which
serves from a separate process (so the client's threads and the server's do not share one GIL):
the original big-endian ImageJ TIFF over HTTP with Range, and ``render_image_region`` answering
each region as an RGB PNG (Pillow, default compression, as the image-region microservice answers
greyscale) from an EM-like uint8 volume with the real plane size, 775 × 1121, and ``--depth``
planes. Each run is the CLI as a user runs it, in a throw-away project with one dataset per route
and tile size:

- ``python -m emdata -q fetch <key>`` (``data/raw/<key>`` deleted first): API answers plus the
  TIFF, or plus every tile (``EMDATA_FETCH_WORKERS`` parallel requests, default 4);
- ``python -m emdata -q normalize <key>``: the HDF5 (the render route decodes its PNGs here).

Two server modes, one after the other in the same run:

- ``rendering``: the server renders and encodes every tile when asked, as OMERO does;
- ``cached``: the server answers from a cache filled by an untimed first fetch, so the time is
  the transfer and emdata's own work (requests, checks, hashing, writing, PNG decoding).

The runs alternate (order rotated each round), the best of ``--repeat`` counts, and every
output's ``array_sha256`` must be the same (byte-identical ``/raw`` by both routes). Throughput is
MB of voxels (Z × Y × X bytes) per second, for fetch alone and for fetch + normalize.

    python benchmarks/idr_routes.py --depth 48 --tiles 256,512,1024,1121 --repeat 3

The replica is Python and runs on this machine's two cores beside the client; the real OMERO
renders on its own servers, across the internet. The numbers compare the routes here; they do
not predict IDR's speed.
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
WORK = HERE / ".work" / "idr_routes"
PLANE = (775, 1121)  # the real image's rows and columns


def serve(root: Path, depth: int, cache: bool) -> None:
    """Build the replica (original TIFF + API) and serve it until stdin closes."""
    import numpy as np

    from emdata.testing.http_server import ReplicaServer
    from emdata.testing.idr import (
        DATASET_ID,
        FOLDER,
        IMAGE_ID,
        U2OS_XY,
        IdrImage,
        IdrReplica,
        write_imagej_tiff,
    )

    rng = np.random.default_rng(86)
    yy, xx = np.mgrid[0:PLANE[0], 0:PLANE[1]]
    volume = np.empty((depth, *PLANE), np.uint8)
    for z in range(depth):  # smooth structure plus noise, plane by plane (no volume-sized temporaries)
        base = 128 + 45 * np.sin(xx / 37.0 + z / 9.0) * np.cos(yy / 53.0)
        volume[z] = np.clip(base + rng.normal(0, 18, PLANE), 0, 255).astype(np.uint8)
    replica = IdrReplica(root, render_cache={} if cache else None)
    img = IdrImage(IMAGE_ID, U2OS_XY, DATASET_ID, volume, (0.02, 0.02, 0.02), FOLDER + U2OS_XY)
    replica.images[img.id] = img
    write_imagej_tiff(root / FOLDER.lstrip("/") / U2OS_XY, volume)
    with ReplicaServer(root) as server:
        replica.serve(server)
        print(server.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def start_server(depth: int, cache: bool) -> tuple[subprocess.Popen, str]:
    root = WORK / "www"
    shutil.rmtree(root, ignore_errors=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--depth", str(depth),
                             *(["--cache"] if cache else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    url = proc.stdout.readline().strip() if proc.stdout else ""
    if not url.startswith("http://"):
        proc.kill()
        sys.exit("the replica server did not start")
    return proc, url


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH", "")]))
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def make_project(project: Path, url: str, tiles: list[int]) -> dict[str, str]:
    """params.yaml with ``original`` and one ``render_<tile>`` dataset; key -> label."""
    import yaml

    from emdata.testing.idr import idr_entry

    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    datasets = {"original": idr_entry(url)}
    labels = {"original": "original TIFF"}
    for tile in tiles:
        datasets[f"render_{tile}"] = idr_entry(url, pixels="render", tile_size=tile)
        labels[f"render_{tile}"] = f"render, tile {tile}"
    params = {"normalize": {"chunks": [64, 64, 64], "compression": "none"}, "datasets": datasets}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return labels


def timed(project: Path, *args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emdata", "-q", *args], cwd=project, env=child_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"`emdata {' '.join(args)}` failed: {proc.stderr.strip()}")
    return elapsed


def run_once(project: Path, key: str) -> tuple[float, float, str, int]:
    for path in (project / "data" / "raw" / key, project / "data" / "processed" / f"{key}.h5"):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    subprocess.run(["sync"], check=False)
    fetch = timed(project, "fetch", key)
    normalize = timed(project, "normalize", key)
    record = json.loads((project / "data" / "metadata" / f"{key}.json").read_text())
    raw = project / "data" / "raw" / key
    raw_bytes = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    return fetch, normalize, record["array_sha256"], raw_bytes


def measure(mode: str, depth: int, tiles: list[int], repeat: int) -> tuple[dict[str, tuple[float, float]],
                                                                          dict[str, str], dict[str, int], dict[str, str]]:
    """Best (fetch, normalize) seconds per dataset of one server mode; hashes; raw bytes; labels."""
    server, url = start_server(depth, cache=mode == "cached")
    try:
        project = WORK / "project"
        labels = make_project(project, url, tiles)
        keys = list(labels)
        timed(project, "list")  # warm imports and bytecode
        if mode == "cached":
            for key in keys[1:]:
                run_once(project, key)  # fills the server's cache; not timed
        best: dict[str, tuple[float, float]] = {}
        hashes, sizes = {}, {}
        for round_ in range(repeat):
            order = keys[round_ % len(keys):] + keys[:round_ % len(keys)]
            for key in order:
                fetch, normalize, digest, raw_bytes = run_once(project, key)
                hashes[key], sizes[key] = digest, raw_bytes
                print(f"{mode} round {round_ + 1} {labels[key]:<18} fetch {fetch:6.2f} s  normalize {normalize:5.2f} s  "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                old = best.get(key)
                if old is None or fetch + normalize < sum(old):
                    best[key] = (fetch, normalize)
        return best, hashes, sizes, labels
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=48, help="planes of 775 x 1121 (the real image has 184)")
    parser.add_argument("--tiles", default="256,512,1024,1121", help="render tile sizes to compare")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="rendering,cached", help="server modes: rendering, cached")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    if args.serve:
        serve(args.serve, args.depth, args.cache)
        return
    tiles = [int(t) for t in args.tiles.split(",") if t]
    mb = args.depth * PLANE[0] * PLANE[1] / 1e6
    digests = set()
    tables = []
    for mode in args.modes.split(","):
        best, hashes, sizes, labels = measure(mode, args.depth, tiles, args.repeat)
        digests |= set(hashes.values())
        base_fetch, base_norm = best["original"]
        rows = [f"\nserver mode: {mode}\n",
                "| route | fetch | fetch MB/s | fetch + normalize | MB/s | vs original (fetch / total) | raw on disk |",
                "|---|---|---|---|---|---|---|"]
        for key in labels:
            fetch, normalize = best[key]
            ratio = "" if key == "original" else \
                f"{base_fetch / fetch:.3f}× / {(base_fetch + base_norm) / (fetch + normalize):.3f}×"
            rows.append(f"| {labels[key]} | {fetch:.2f} s | {mb / fetch:.1f} | {fetch + normalize:.2f} s | "
                        f"{mb / (fetch + normalize):.1f} | {ratio} | {sizes[key] / 1e6:.1f} MB |")
        render = [k for k in labels if k != "original"]
        if render:
            top = min(render, key=lambda k: sum(best[k]))
            rows.append(f"\nbest tile size ({mode}): {labels[top]} ({mb / sum(best[top]):.1f} MB/s fetch + normalize)")
        tables.append("\n".join(rows))
    if len(digests) != 1:
        sys.exit(f"the routes disagree: {sorted(digests)}")
    print(f"\n{args.depth} x {PLANE[0]} x {PLANE[1]} uint8 = {mb:.1f} MB of voxels; /raw identical by every route "
          f"and mode (array_sha256 {next(iter(digests))[:16]}...); best of {args.repeat}")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
