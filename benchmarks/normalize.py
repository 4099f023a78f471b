"""Streaming `emdata normalize` versus a naive converter, on a generated EM-like TIFF.

Both run as separate processes on the same warm-cache TIFF and write the same layout (64^3 chunks,
no compression). The naive converter is what many loaders do: ``tifffile.imread`` of the whole
volume, then one ``h5py`` write. ``emdata normalize`` does more work (voxel sha256, exact
statistics, file sha256 and the metadata record) in one slab of memory at a time.

    python benchmarks/normalize.py --gib 1.0 --repeat 2

Prints MB/s and peak RSS of each, and their ratios, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NAIVE = """
import sys, h5py, tifffile
volume = tifffile.imread(sys.argv[1])
with h5py.File(sys.argv[2], "w") as f:
    f.create_dataset("raw", data=volume, chunks=(64, 64, 64))
"""


def make_tiff(path: Path, pages: int, side: int) -> None:
    """EM-like uint8 pages: smooth structure plus noise, written page by page."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    with tifffile.TiffWriter(path) as writer:
        for z in range(pages):
            base = 128 + 60 * np.sin(12 * xx + z / 40) * np.cos(9 * yy - z / 55)
            page = np.clip(base + rng.normal(0, 25, (side, side)), 0, 255).astype(np.uint8)
            writer.write(page, contiguous=True, photometric="minisblack")


def make_project(root: Path, tiff: Path, side: int) -> None:
    import yaml

    spec = {"kind": "epfl", "base_url": "https://example.invalid/bench/", "image": {"file": "volume.tif"}}
    params = {"normalize": {"chunks": [64, 64, 64], "compression": "none"},
              "datasets": {"bench": {"title": "benchmark volume", "license": "-", "citation": "-", "modality": "FIB-SEM",
                                     "voxel_size_nm": [5, 5, 5], "source": spec}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    raw = root / "data" / "raw" / "bench"
    raw.mkdir(parents=True, exist_ok=True)
    target = raw / "volume.tif"
    target.unlink(missing_ok=True)  # always the TIFF of this run, never one left from another size
    os.link(tiff, target)
    spec_full = {"kind": "epfl", "base_url": spec["base_url"], "labels": {},
                 "image": {"name": "volume.tif", "url": spec["base_url"] + "volume.tif", "size": None, "sha256": None}}
    record = {"dataset": "bench", "kind": "epfl", "spec": spec_full,
              "files": {"volume.tif": {"url": spec["base_url"] + "volume.tif", "size": tiff.stat().st_size}}}
    (raw / "source.json").write_text(json.dumps(record))


def run(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="volume size in GiB (default 1.0)")
    parser.add_argument("--side", type=int, default=1024, help="page width and height (default 1024)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each converter; the best is kept")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.work"))
    args = parser.parse_args()
    pages = max(64, round(args.gib * 2**30 / args.side**2))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tiff = work / f"em_{pages}x{args.side}x{args.side}.tif"
    if not tiff.exists():
        print(f"generating {tiff} ...", flush=True)
        make_tiff(tiff, pages, args.side)
    project = work / f"project_{pages}x{args.side}"
    project.mkdir(exist_ok=True)
    make_project(project, tiff, args.side)
    subprocess.run(["cat", str(tiff)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    nbytes = pages * args.side**2
    slab = 64 * args.side**2
    check = run([sys.executable, "-m", "emdata", "-q", "normalize", "bench"], project)  # also a warm-up
    record = json.loads((project / "data" / "metadata" / "bench.json").read_text())
    if record["shape"] != [pages, args.side, args.side]:
        raise SystemExit(f"normalized the wrong volume: {record['shape']}")
    del check
    results: dict[str, list[tuple[float, int]]] = {"emdata normalize": [], "naive": []}
    outputs = [project / "data" / "processed" / "bench.h5", work / "naive.h5"]
    for _ in range(args.repeat):  # alternate, so both see the same machine state
        for out in outputs:  # as `dvc repro` does: no old output to replace (its unlink costs ~0.4 s/GiB)
            out.unlink(missing_ok=True)
        results["emdata normalize"].append(run([sys.executable, "-m", "emdata", "-q", "normalize", "bench"], project))
        results["naive"].append(run([sys.executable, "-c", NAIVE, str(tiff), str(work / "naive.h5")], work))
    best = {name: (min(s for s, _ in runs), max(r for _, r in runs)) for name, runs in results.items()}
    print(f"volume: {pages} x {args.side} x {args.side} uint8 = {nbytes / 2**30:.2f} GiB; "
          f"slab (64 sections) = {slab / 2**20:.0f} MiB; best of {args.repeat}")
    for name, (seconds, rss) in best.items():
        print(f"{name:<18} {nbytes / seconds / 1e6:8.0f} MB/s  {seconds:6.2f} s  peak RSS {rss / 2**20:7.0f} MiB")
    (s_e, r_e), (s_n, r_n) = best["emdata normalize"], best["naive"]
    print(f"ratio: emdata is {s_n / s_e:.2f}x the naive converter's MB/s, with {r_e / r_n:.2f}x its peak RSS; "
          f"emdata peak RSS = slab + {(r_e - slab) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
