"""`emdata normalize` versus a naive converter and a bare chunked HDF5 write, on generated EM-like TIFFs.

Speed mode (default). Three converters run as separate processes on the same warm-cache TIFF and
write the same layout (64^3 chunks, no compression):

* ``emdata normalize``: the CLI, as ``dvc repro`` runs it. Besides the HDF5 it computes the voxel
  sha256, exact statistics, checks the file, renames it, and writes the metadata record (which
  reads the whole HDF5 again for its file sha256).
* naive: what many loaders do, ``tifffile.imread`` of the whole volume, then one ``h5py`` write.
* bare: the floor of a streaming converter, the TIFF read 64 pages at a time
  (``TiffFile.asarray(key=range(z0, z1))``) and each slab written into a 64^3-chunked dataset;
  no hashes, no statistics, no record.

Runs alternate (the order rotates each round) and the best of ``--repeat`` counts::

    python benchmarks/normalize.py --gib 1 --repeat 3

or, on a machine whose speed drifts, ``--pairs N``: N pairs of normalize and the bare write back
to back (order alternating), the median of the per-pair ratios and CPU-seconds per GiB::

    python benchmarks/normalize.py --gib 1 --pairs 5

Memory mode checks that normalize's peak RSS stays under its memory budget + 200 MB on volumes
whose 64-deep slab does not fit the budget (16 x 5500 x 5496 and 512 x 2048 x 2048 uint8), and
verifies each output: the record's shape, and its ``array_sha256`` against a sha256 computed
here over the TIFF pages in order::

    python benchmarks/normalize.py --memory

Every TIFF is generated page by page (the generator holds one band of rows, not the volume) and
kept in ``--workdir`` for the next run. A warm-up normalize (it compiles the numba histogram
kernel once; it is cached afterwards) runs before anything is timed. Peak RSS is the child's
``ru_maxrss`` from ``os.wait4``, shown with its anonymous and file-backed parts (RssAnon and RssFile
sampled from /proc/<pid>/status every 20 ms); CPU is its user + system time. Each run waits (up to 2 min) for
the machine to be idle first, and "others" reports the cores the rest of the machine used during
the run (from /proc/stat): a run with others > 0.1 was disturbed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIB = 1 << 20
SLACK = 200_000_000  # memory mode: peak RSS must stay below budget + 200 MB
MEMORY_VOLUMES = ((16, 5500, 5496), (512, 2048, 2048))

NAIVE = """
import sys, h5py, tifffile
volume = tifffile.imread(sys.argv[1])
with h5py.File(sys.argv[2], "w") as f:
    f.create_dataset("raw", data=volume, chunks=(64, 64, 64))
"""

BARE = """
import sys, h5py, tifffile
with tifffile.TiffFile(sys.argv[1]) as tif, h5py.File(sys.argv[2], "w") as f:
    first = tif.pages.first
    depth = len(tif.pages)
    chunks = tuple(min(64, n) for n in (depth, *first.shape))
    dset = f.create_dataset("raw", shape=(depth, *first.shape), dtype=first.dtype, chunks=chunks)
    for z0 in range(0, depth, 64):
        z1 = min(depth, z0 + 64)
        dset[z0:z1] = tif.asarray(key=range(z0, z1))
"""


# --- data and project ---------------------------------------------------------------------------


def make_tiff(path: Path, shape: tuple[int, int, int], band: int = 1024) -> None:
    """EM-like uint8 pages: smooth structure plus noise, written page by page, in bands of rows."""
    import tifffile

    pages, height, width = shape
    rng = np.random.default_rng(0)
    xx = np.arange(width)[None, :] / width
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=np.prod(shape, dtype=np.int64) > 2**32 - 2**26) as writer:
        for z in range(pages):
            page = np.empty((height, width), np.uint8)
            across = np.sin(12 * xx + z / 40)
            for y0 in range(0, height, band):
                y1 = min(height, y0 + band)
                yy = np.arange(y0, y1)[:, None] / height
                base = 128 + 60 * across * np.cos(9 * yy - z / 55)
                page[y0:y1] = np.clip(base + rng.normal(0, 25, (y1 - y0, width)), 0, 255)
            writer.write(page, contiguous=True, photometric="minisblack")
    tmp.rename(path)


def tiff_for(work: Path, shape: tuple[int, int, int]) -> Path:
    tiff = work / f"em_{shape[0]}x{shape[1]}x{shape[2]}.tif"
    if not tiff.exists():
        print(f"generating {tiff.name} ...", flush=True)
        started = time.perf_counter()
        make_tiff(tiff, shape)
        print(f"  {tiff.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
    return tiff


def pages_sha256(tiff: Path) -> str:
    """sha256 of the TIFF's voxels, page by page in file order, little-endian C order."""
    import tifffile

    digest = hashlib.sha256()
    with tifffile.TiffFile(tiff) as tif:
        for page in tif.pages:
            data = page.asarray()
            digest.update(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).data)
    return digest.hexdigest()


def make_project(root: Path, tiff: Path, budget_mb: int | None = None) -> None:
    """A one-dataset project whose raw folder is ``tiff``, with a fetch record built by the package."""
    import yaml

    from emdata.params.config import load_config
    from emdata.sources.dataset import resolve_dataset
    from emdata.sources.fetch.record import FetchedFile, FetchRecord

    root.mkdir(parents=True, exist_ok=True)
    normalize = {"chunks": [64, 64, 64], "compression": "none"}
    if budget_mb is not None:
        normalize["memory_budget_mb"] = budget_mb
    source = {"kind": "epfl", "base_url": "https://example.invalid/bench/", "image": {"file": "volume.tif"}}
    params = {"normalize": normalize,
              "datasets": {"bench": {"title": "benchmark volume", "license": "-", "citation": "-",
                                     "modality": "FIB-SEM", "voxel_size_nm": [5, 5, 5], "offset_nm": [0, 0, 0],
                                     "source": source}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(root)
    ds = resolve_dataset(cfg, "bench")
    spec = ds.source
    raw = cfg.raw_dir("bench")
    raw.mkdir(parents=True, exist_ok=True)
    target = raw / spec.image.name
    target.unlink(missing_ok=True)  # always the TIFF of this run, never one left from another size
    os.link(tiff, target)
    files = {spec.image.name: FetchedFile(url=spec.image.url, size=target.stat().st_size, sha256=None)}
    FetchRecord(dataset="bench", kind=ds.source_kind, spec=spec.to_dict(), files=files).write(raw)


# --- running ------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    rss: int  # peak resident set, bytes
    cpu: float  # user + system seconds
    others: float = 0.0  # CPU seconds the rest of the machine used meanwhile
    anon: int = 0  # peak anonymous resident memory, bytes (sampled every 20 ms)
    file: int = 0  # peak file-backed resident memory (mapped files), bytes (sampled)


class RssSampler(threading.Thread):
    """Polls /proc/<pid>/status for RssAnon and RssFile while the child runs (Linux only)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.done = threading.Event()
        self.peak = {"RssAnon:": 0, "RssFile:": 0}

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                text = self.path.read_text()
            except OSError:
                return
            for row in text.splitlines():
                key, _, value = row.partition("\t")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)


def busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float = 0.2, patience: float = 120.0) -> None:
    """Wait (up to ``patience`` s) until the machine is idle: below ``limit`` busy cores over 1 s."""
    deadline = time.monotonic() + patience
    while True:
        busy = busy_seconds()
        time.sleep(1.0)
        load = busy_seconds() - busy
        if load < limit:
            return
        if time.monotonic() > deadline:
            print(f"  (the machine is still busy, {load:.2f} cores used by others; measuring anyway)", flush=True)
            return


def run(cmd: list[str], cwd: Path) -> Run:
    """Wall seconds, peak RSS and CPU seconds of one child process, and the machine's other load."""
    wait_quiet()
    busy = busy_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = RssSampler(proc.pid)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    busy = busy_seconds() - busy
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if status != 0:
        raise SystemExit(f"{cmd} failed: {err[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Run(seconds, usage.ru_maxrss * 1024, cpu, max(0.0, busy - cpu), sampler.peak["RssAnon:"],
               sampler.peak["RssFile:"])


def normalize_cmd() -> list[str]:
    return [sys.executable, "-m", "emdata", "-q", "normalize", "bench"]


def normalize_and_verify(project: Path, shape: tuple[int, ...], expected_sha: str | None) -> Run:
    """One normalize run from no output; then the record must have the shape and the voxel sha256."""
    for out in (project / "data" / "processed" / "bench.h5", project / "data" / "metadata" / "bench.json"):
        out.unlink(missing_ok=True)
    result = run(normalize_cmd(), project)
    record = json.loads((project / "data" / "metadata" / "bench.json").read_text())
    if record["shape"] != list(shape):
        raise SystemExit(f"normalized the wrong volume: record shape {record['shape']}, volume {list(shape)}")
    if expected_sha is not None and record["array_sha256"] != expected_sha:
        raise SystemExit(f"array_sha256 {record['array_sha256']} != sha256 of the TIFF pages {expected_sha}")
    return result


def warm(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # into the page cache


def warm_up(work: Path) -> None:
    """One small normalize, so the numba kernel is compiled (and cached) before anything is timed."""
    shape = (64, 256, 256)
    tiff = tiff_for(work, shape)
    project = work / "project_warmup"
    make_project(project, tiff)
    result = normalize_and_verify(project, shape, pages_sha256(tiff))
    print(f"warm-up normalize of {'x'.join(map(str, shape))} (compiles the numba kernel, or loads it from its cache): "
          f"{result.seconds:.1f} s", flush=True)


def code_state() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "src"], capture_output=True,
                               text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "code: unknown (no git)"
    return f"code: {head}" + (f" + {len(dirty)} uncommitted change(s) under src/" if dirty else " (src clean)")


def line(name: str, nbytes: int, r: Run) -> str:
    return (f"{name:<16} {nbytes / r.seconds / 1e6:5.0f} MB/s {r.seconds:6.2f} s  peak RSS {r.rss / MIB:5.0f} MiB "
            f"(anon {r.anon / MIB:4.0f}, file {r.file / MIB:4.0f})  CPU {r.cpu:5.2f} s = {r.cpu / r.seconds:.2f} cores;"
            f" others {r.others / r.seconds:.2f}")


def summary(runs: list[Run]) -> Run:
    """The fastest run's time and CPU, with the highest memory any run reached."""
    fastest = min(runs, key=lambda r: r.seconds)
    return Run(fastest.seconds, max(r.rss for r in runs), fastest.cpu, fastest.others, max(r.anon for r in runs),
               max(r.file for r in runs))


# --- the two modes ------------------------------------------------------------------------------


def speed(args: argparse.Namespace, work: Path) -> None:
    pages = max(64, round(args.gib * 2**30 / args.side**2))
    shape = (pages, args.side, args.side)
    nbytes = int(np.prod(shape))
    tiff = tiff_for(work, shape)
    project = work / f"project_{pages}x{args.side}"
    make_project(project, tiff, args.budget_mb)
    warm(tiff)
    warm_up(work)
    expected = pages_sha256(tiff)
    normalize_and_verify(project, shape, expected)  # the layout is right before it is timed
    converters = {
        "emdata normalize": (normalize_cmd(), project, project / "data" / "processed" / "bench.h5"),
        "naive": ([sys.executable, "-c", NAIVE, str(tiff), str(work / "naive.h5")], work, work / "naive.h5"),
        "bare chunked": ([sys.executable, "-c", BARE, str(tiff), str(work / "bare.h5")], work, work / "bare.h5"),
    }
    names = list(converters)
    results: dict[str, list[Run]] = {name: [] for name in names}
    print(f"volume: {pages} x {args.side} x {args.side} uint8 = {nbytes / 2**30:.2f} GiB; {code_state()}")
    if args.pairs:
        paired(args.pairs, converters["emdata normalize"], converters["bare chunked"], nbytes)
        return
    for k in range(args.repeat):  # alternate, so all see the same machine state; rotate the order
        for name in names[k % 3:] + names[:k % 3]:
            cmd, cwd, out = converters[name]
            out.unlink(missing_ok=True)  # as `dvc repro` does: no old output to replace
            results[name].append(run(cmd, cwd))
            print(f"  run {k + 1}: {line(name, nbytes, results[name][-1])}", flush=True)
    best = {name: summary(runs) for name, runs in results.items()}
    print(f"best of {args.repeat} (time, CPU, others: the fastest run; memory: the highest of the runs):")
    for name in names:
        print("  " + line(name, nbytes, best[name]))
    e, n, b = (best[name] for name in names)
    print(f"normalize / naive: {n.seconds / e.seconds:.2f}x the MB/s (target >= 1.2x: "
          f"{'met' if n.seconds / e.seconds >= 1.2 else 'MISSED'}), {e.rss / n.rss:.2f}x the peak RSS")
    print(f"normalize / bare:  {b.seconds / e.seconds:.2f}x the MB/s (target >= 0.8x: "
          f"{'met' if b.seconds / e.seconds >= 0.8 else 'MISSED'}); normalize takes {e.seconds - b.seconds:+.2f} s more")
    for out in (work / "naive.h5", work / "bare.h5"):
        out.unlink(missing_ok=True)


def paired(count: int, normalize: tuple, bare: tuple, nbytes: int) -> None:
    """``count`` pairs of normalize and the bare write back to back, the order alternating; the
    ratio of each pair is taken before the median, so a machine whose speed drifts between pairs
    (the bare write's own time moved 2.4x between rounds here) still gives a stable figure."""
    ratios, cpu = [], {"emdata normalize": [], "bare chunked": []}
    rss = 0
    for k in range(count):
        order = [("emdata normalize", normalize), ("bare chunked", bare)]
        if k % 2:
            order.reverse()
        got = {}
        for name, (cmd, cwd, out) in order:
            out.unlink(missing_ok=True)
            got[name] = run(cmd, cwd)
            cpu[name].append(got[name].cpu / (nbytes / 2**30))
            print(f"  pair {k + 1}: {line(name, nbytes, got[name])}", flush=True)
        rss = max(rss, got["emdata normalize"].rss)
        ratios.append(got["bare chunked"].seconds / got["emdata normalize"].seconds)
    print(f"paired over {count} pairs: normalize / bare = {float(np.median(ratios)):.2f}x the MB/s (median; "
          f"min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 0.6)")
    for name, values in cpu.items():
        print(f"  {name:<16} {float(np.median(values)):.2f} CPU-seconds per GiB (median)")
    print(f"  normalize peak RSS {rss / MIB:.0f} MiB")


def memory(args: argparse.Namespace, work: Path) -> None:
    from emdata.params.config import load_config
    from emdata.h5.hdf5 import chunk_shape
    from emdata.core.boxes import plan_tiles

    warm_up(work)
    print(code_state())
    rows = []
    failed = False
    for shape in MEMORY_VOLUMES:
        nbytes = int(np.prod(shape))
        tiff = tiff_for(work, shape)
        project = work / f"project_{'x'.join(map(str, shape))}"
        make_project(project, tiff, args.budget_mb)
        cfg = load_config(project)
        budget = cfg.normalize.memory_budget
        plan = plan_tiles(shape, chunk_shape(cfg.normalize.chunks, shape), 1, budget)
        mode = "one pass" if plan.one_pass else f"two-pass, {len(plan.hash_boxes or [])} hash boxes"
        mode = f"{len(plan.tiles)} tiles of {plan.tile_bytes / MIB:.0f} MiB, {mode}"
        expected = pages_sha256(tiff)
        warm(tiff)
        runs = []
        for _ in range(args.repeat):
            runs.append(normalize_and_verify(project, shape, expected))
            print(f"  {'x'.join(map(str, shape))}: {line('emdata normalize', nbytes, runs[-1])}", flush=True)
        r = summary(runs)
        limit = budget + SLACK
        failed |= r.rss >= limit
        rows.append(f"{' x '.join(map(str, shape)):<17} {budget / MIB:4.0f} MiB  {mode:<44} {r.rss / MIB:5.0f} MiB "
                    f"{(r.rss - budget) / MIB:+6.0f} MiB {r.anon / MIB:5.0f} MiB {r.file / MIB:5.0f} MiB "
                    f"{nbytes / r.seconds / 1e6:5.0f}  yes       {'yes' if r.rss < limit else 'NO':<4} "
                    f"{'yes' if r.anon < limit else 'NO'}")
        (project / "data" / "processed" / "bench.h5").unlink(missing_ok=True)
    print(f"memory mode, best of {args.repeat}; limit = budget + 200 MB = {limit / MIB:.0f} MiB; verified = record "
          "shape is the volume's and array_sha256 = sha256 of the TIFF pages in order")
    print(f"{'volume (uint8)':<17} {'budget':>8}  {'plan':<44} {'peak RSS':>9} {'RSS-budget':>10} {'anon':>9} "
          f"{'file':>9} {'MB/s':>5}  verified  RSS<limit anon<limit")
    for row in rows:
        print(row)
    if failed:
        raise SystemExit("peak RSS (ru_maxrss) exceeded budget + 200 MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="speed mode: volume size in GiB (default 1.0)")
    parser.add_argument("--side", type=int, default=1024, help="speed mode: page width and height (default 1024)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each converter, the best counts (default 3; 1 in memory mode)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="speed mode: instead of best-of rounds, N pairs of normalize and the bare write "
                             "(order alternating), reporting the median of the per-pair ratios")
    parser.add_argument("--memory", action="store_true",
                        help="check peak RSS under the memory budget on 16x5500x5496 and 512x2048x2048 volumes")
    parser.add_argument("--budget-mb", type=int, default=None,
                        help="normalize.memory_budget_mb in the generated params.yaml (default: emdata's, 256)")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.memory else 3)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (memory if args.memory else speed)(args, work)


if __name__ == "__main__":
    main()
