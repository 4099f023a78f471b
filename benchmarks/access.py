"""Block access from the default HDF5 layout versus a numpy memmap of the same volume.

Generates an EM-like uint8 volume, writes it once as emdata's default layout (64^3 chunks, no
compression) and once as a .npy file, warms the page cache, then measures in this one run:

- random unaligned 64^3 and 128^3 patches, and random full XY sections, in 1 and 2 processes;
- a torch DataLoader with 2 workers over RandomPatches (64^3) versus the same loader over a
  memmap dataset drawing the same origins.

    python benchmarks/access.py --side 768 --seconds 3

Both read the same origins, open their file inside the timing, and run twice (best counts).
Prints patches/s for both and the ratio emdata / memmap.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from emdata.access.sampling import RandomPatches
from emdata.access.volume import Volume


def make_files(work: Path, side: int) -> tuple[Path, Path]:
    from emdata.testing.volumes import write_canonical

    h5, npy = work / f"vol_{side}.h5", work / f"vol_{side}.npy"
    if not (h5.exists() and npy.exists()):
        print(f"generating a {side}^3 uint8 volume ...", flush=True)
        rng = np.random.default_rng(0)
        vol = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(side,) * 3)
        for z in range(side):
            vol[z] = np.clip(128 + rng.normal(0, 30, (side, side)), 0, 255)
        vol.flush()
        write_canonical(h5, np.asarray(vol), chunks=(64, 64, 64))
    for path in (h5, npy):  # warm the page cache for both
        with open(path, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return h5, npy


def _origins(shape: tuple[int, ...], patch: tuple[int, ...], count: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)) for _ in range(count)]


def _read_emdata(args) -> int:
    path, patch, origins = args
    vol = Volume(path)
    for o in origins:
        vol.read(o, patch)
    return len(origins)


def _read_memmap(args) -> int:
    path, patch, origins = args
    mm = np.load(path, mmap_mode="r")
    for o in origins:
        np.array(mm[tuple(slice(a, a + p) for a, p in zip(o, patch))])
    return len(origins)


def compare(h5: Path, npy: Path, patch: tuple[int, ...], shape: tuple[int, ...], seconds: float,
            procs: int) -> tuple[float, float]:
    """Patches per second of emdata and of the memmap, in ``procs`` processes.

    Both read the same origins; the count is sized so the memmap run takes about ``seconds``.
    Opening the file is inside the timing (once per process, as in training). Each is run twice,
    alternating, and the better run counts, so neither pays alone for first-touch page faults.
    """
    probe = _origins(shape, patch, 50, 99)
    start = time.perf_counter()
    _read_memmap((npy, patch, probe))
    count = max(procs * 20, int(seconds * len(probe) / (time.perf_counter() - start)))
    jobs = [_origins(shape, patch, count // procs, seed) for seed in range(procs)]
    best = {_read_emdata: 0.0, _read_memmap: 0.0}
    for _ in range(2):
        for fn, path in ((_read_emdata, h5), (_read_memmap, npy)):
            start = time.perf_counter()
            if procs == 1:
                done = fn((path, patch, jobs[0]))
            else:
                with mp.get_context("fork").Pool(procs) as pool:
                    done = sum(pool.map(fn, [(path, patch, j) for j in jobs]))
            best[fn] = max(best[fn], done / (time.perf_counter() - start))
    return best[_read_emdata], best[_read_memmap]


class MemmapPatches:
    """The baseline loader: same origins as a RandomPatches, read from a memmap."""

    def __init__(self, npy: Path, sampler: RandomPatches) -> None:
        self.npy, self.sampler, self.mm = npy, sampler, None

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int):
        import torch

        if self.mm is None:
            self.mm = np.load(self.npy, mmap_mode="r")
        o, p = self.sampler.origin(i), self.sampler.patch
        patch = np.array(self.mm[tuple(slice(a, a + n) for a, n in zip(o, p))])
        return {"raw": torch.from_numpy(patch.astype(np.float32)[None]), "origin": torch.tensor(o)}


def loader_rate(dataset) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=8, num_workers=2, multiprocessing_context="fork")
    start = time.perf_counter()
    n = sum(batch["raw"].shape[0] for batch in loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=768, help="volume edge in voxels (default 768: 432 MiB)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.work"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    h5, npy = make_files(args.workdir.resolve(), args.side)
    shape = (args.side,) * 3
    print(f"volume {shape} uint8, emdata default layout (64^3 chunks, no compression) vs numpy memmap")
    print(f"{'read':<22} {'procs':>5} {'emdata/s':>10} {'memmap/s':>10} {'ratio':>6}")
    cases = [("random 64^3", (64, 64, 64)), ("random 128^3", (128, 128, 128)), ("XY section", (1, args.side, args.side))]
    for name, patch in cases:
        for procs in (1, 2):
            ours, base = compare(h5, npy, patch, shape, args.seconds, procs)
            print(f"{name:<22} {procs:>5} {ours:>10.1f} {base:>10.1f} {ours / base:>6.2f}", flush=True)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: DataLoader comparison skipped")
        return
    from emdata.access.torch import PatchDataset

    sampler = RandomPatches(Volume(h5), (64, 64, 64), seed=0, length=int(2000 * args.seconds))
    ours = max(loader_rate(PatchDataset(sampler)) for _ in range(2))
    base = max(loader_rate(MemmapPatches(npy, sampler)) for _ in range(2))
    print(f"{'DataLoader 64^3':<22} {'2 wk':>5} {ours:>10.1f} {base:>10.1f} {ours / base:>6.2f}")


if __name__ == "__main__":
    main()
