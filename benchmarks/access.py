"""Block access from the default HDF5 layout versus a numpy memmap of the same volume.

Generates an EM-like uint8 volume, writes it once as emdata's default layout (64^3 chunks, no
compression) and once as a .npy file, warms the page cache, then measures in this one run:

- random unaligned 64^3 and 128^3 patches, and random full XY sections, in 1 and 2 processes;
- a torch DataLoader with 2 workers at batch 1 and batch 8 over PatchDataset(RandomPatches(...))
  (64^3, native uint8) versus the same loader over the same origins read from the memmap
  (PatchDataset over MemmapPatches: same items, same collate, same transport), plus, for
  reference, a hand-written memmap Dataset shipping plain dicts of uint8 tensors.

    python benchmarks/access.py --side 768 --seconds 3
    python benchmarks/access.py --loaders-only      # only the DataLoader rows

Both read the same origins and open their file inside the timing (block reads: twice, the better
run counts; DataLoaders: best of --rounds alternating rounds). Prints patches/s for both and the
ratio emdata / memmap.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from emdata.access.sampling import Patch, RandomPatches
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
    """The baseline sampler: the same origins as a RandomPatches, read from a memmap of the .npy.

    Wrapped in the same ``PatchDataset``, it makes the same items (uint8 tensors, origin) that
    travel the same way, so the loaders differ only in how a patch is read.
    """

    def __init__(self, npy: Path, sampler: RandomPatches) -> None:
        self.npy, self.sampler, self.patch, self.mm = npy, sampler, sampler.patch_shape, None

    def __len__(self) -> int:
        return len(self.sampler)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "mm": None}  # each worker maps the file itself

    def origin(self, i: int) -> tuple[int, ...]:
        return self.sampler.origin(i)

    def __getitem__(self, i: int) -> Patch:
        if self.mm is None:
            self.mm = np.load(self.npy, mmap_mode="r")
        o = self.sampler.origin(i)
        return Patch(o, np.array(self.mm[tuple(slice(a, a + n) for a, n in zip(o, self.patch))]))


class PlainMemmapDataset:
    """Reference only: the memmap Dataset one would write by hand, a plain dict of uint8 tensors
    shipped the way torch ships them by default (one shared-memory segment per tensor)."""

    def __init__(self, patches: MemmapPatches) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        import torch

        patch = self.patches[i]
        return {"raw": torch.from_numpy(patch.raw[None]), "origin": torch.tensor(patch.origin)}


def loader_rate(dataset, batch_size: int) -> float:
    """Patches per second through ``DataLoader(batch_size=..., num_workers=2)``, workers started inside."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=2, multiprocessing_context="fork")
    start = time.perf_counter()
    n = sum(batch["raw"].shape[0] for batch in loader)
    return n / (time.perf_counter() - start)


def compare_loaders(h5: Path, npy: Path, seconds: float, rounds: int) -> None:
    """DataLoader (2 workers, 64^3) at batch 1 and 8: emdata against the same loader over a memmap.

    Each round runs emdata and memmap alternately (who goes first alternates too) over fresh
    origins (seed = round); the best round counts. Batch 1 is sized at ~1,000 patches/s, batch 8
    at ~2,000 patches/s, so each run takes about ``seconds``.
    """
    from emdata.access.torch import PatchDataset

    volume = Volume(h5)
    print(f"DataLoader, 64^3 uint8 patches, 2 workers (fork), best of {rounds} alternating rounds")
    print(f"{'batch':>5} {'emdata/s':>10} {'memmap/s':>10} {'ratio':>6}   runs (emdata | memmap)")
    results = {}
    for batch_size, per_second in ((1, 1000), (8, 2000)):
        runs: dict[str, list[float]] = {"emdata": [], "memmap": []}
        for r in range(rounds):
            sampler = RandomPatches(volume, (64, 64, 64), seed=r, length=int(per_second * seconds))
            datasets = {"emdata": PatchDataset(sampler), "memmap": PatchDataset(MemmapPatches(npy, sampler))}
            for name in (("emdata", "memmap") if r % 2 == 0 else ("memmap", "emdata")):
                runs[name].append(loader_rate(datasets[name], batch_size))
        ours, base = max(runs["emdata"]), max(runs["memmap"])
        results[batch_size] = (ours, base)
        listed = " ".join(f"{v:.0f}" for v in runs["emdata"]) + " | " + " ".join(f"{v:.0f}" for v in runs["memmap"])
        print(f"{batch_size:>5} {ours:>10.1f} {base:>10.1f} {ours / base:>6.2f}   {listed}", flush=True)
    plain = {}
    for batch_size, per_second in ((1, 400), (8, 1500)):
        sampler = RandomPatches(volume, (64, 64, 64), seed=0, length=int(per_second * seconds))
        plain[batch_size] = max(loader_rate(PlainMemmapDataset(MemmapPatches(npy, sampler)), batch_size)
                                for _ in range(2))
    print(f"reference, a plain memmap Dataset (dict of uint8 tensors, torch's default transport): "
          f"batch 1 {plain[1]:.1f}/s, batch 8 {plain[8]:.1f}/s")
    ours, base = results[1]
    verdict = "met" if ours >= 0.9 * base and ours >= 1000 else "NOT met"
    print(f"batch 1 target (>= 0.9x memmap and >= 1000 patches/s): {verdict} ({ours / base:.2f}x, {ours:.0f}/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=768, help="volume edge in voxels (default 768: 432 MiB)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="DataLoader rounds, best counts (default 3)")
    parser.add_argument("--loaders-only", action="store_true", help="skip the block reads, run only the DataLoaders")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/.work"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    h5, npy = make_files(args.workdir.resolve(), args.side)
    shape = (args.side,) * 3
    print(f"volume {shape} uint8, emdata default layout (64^3 chunks, no compression) vs numpy memmap")
    if not args.loaders_only:
        print(f"{'read':<22} {'procs':>5} {'emdata/s':>10} {'memmap/s':>10} {'ratio':>6}")
        cases = [("random 64^3", (64, 64, 64)), ("random 128^3", (128, 128, 128)),
                 ("XY section", (1, args.side, args.side))]
        for name, patch in cases:
            for procs in (1, 2):
                ours, base = compare(h5, npy, patch, shape, args.seconds, procs)
                print(f"{name:<22} {procs:>5} {ours:>10.1f} {base:>10.1f} {ours / base:>6.2f}", flush=True)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: DataLoader comparison skipped")
        return
    compare_loaders(h5, npy, args.seconds, args.rounds)


if __name__ == "__main__":
    main()
