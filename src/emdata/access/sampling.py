"""Patch samplers: seeded random patches (optionally label-aware) and sliding-window grids.

Reproducibility: patch ``i`` of epoch ``e`` comes from its own random stream,
``numpy.random.default_rng([seed, e, i])``, so it is the same in any process, in any order, with
any number of DataLoader workers.

Label-aware sampling uses the per-chunk foreground counts written by ``normalize``
(``/label_stats/<label>/chunk_foreground``). A patch can hold no more foreground than the chunks
it overlaps, so before drawing anything the sampler finds the best such bound over all patch
positions: a request no patch can satisfy fails at once, with the best achievable fraction in
the message. Candidates are then drawn only where the bound allows the requested fraction, and
checked exactly on the label voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import AccessError, ConfigError
from ..io import hdf5
from .blocks import parse_triple
from .volume import Volume


@dataclass
class Patch:
    origin: tuple[int, int, int]
    raw: np.ndarray
    label: np.ndarray | None = None


def _axis_ranges(size: int, patch: int, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per axis: distinct (first chunk, last chunk) spans of patch positions and how many positions each has."""
    origins = np.arange(size - patch + 1)
    spans = np.stack([origins // chunk, (origins + patch - 1) // chunk], axis=1)
    unique, counts = np.unique(spans, axis=0, return_counts=True)
    return unique[:, 0], unique[:, 1], counts


class _ForegroundBound:
    """Upper bounds on a patch's foreground voxels, from per-chunk counts (summed-area table)."""

    def __init__(self, counts: np.ndarray, chunks: tuple[int, ...], shape: tuple[int, ...], patch: tuple[int, ...]) -> None:
        self.chunks = chunks
        self.patch = patch
        table = np.zeros(tuple(n + 1 for n in counts.shape), np.int64)
        table[1:, 1:, 1:] = counts.cumsum(0).cumsum(1).cumsum(2)
        self.table = table
        self.axes = [_axis_ranges(s, p, c) for s, p, c in zip(shape, patch, chunks)]

    def box_sum(self, lo: tuple[np.ndarray, ...], hi: tuple[np.ndarray, ...]) -> np.ndarray:
        """Sum of counts over chunk boxes [lo, hi] (inclusive), broadcasting over the inputs."""
        t = self.table
        (z0, y0, x0), (z1, y1, x1) = lo, tuple(h + 1 for h in hi)
        return (t[z1, y1, x1] - t[z0, y1, x1] - t[z1, y0, x1] - t[z1, y1, x0]
                + t[z0, y0, x1] + t[z0, y1, x0] + t[z1, y0, x0] - t[z0, y0, x0])

    def all_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Bound and number of patch positions for every combination of per-axis spans."""
        (za, zb, zn), (ya, yb, yn), (xa, xb, xn) = self.axes
        lo = (za[:, None, None], ya[None, :, None], xa[None, None, :])
        hi = (zb[:, None, None], yb[None, :, None], xb[None, None, :])
        bound = self.box_sum(lo, hi)
        positions = zn[:, None, None] * yn[None, :, None] * xn[None, None, :]
        return bound, positions

    def of_origin(self, origin: tuple[int, ...]) -> int:
        lo = tuple(np.int64(o // c) for o, c in zip(origin, self.chunks))
        hi = tuple(np.int64((o + p - 1) // c) for o, p, c in zip(origin, self.patch, self.chunks))
        return int(self.box_sum(lo, hi))


class RandomPatches:
    """Seeded random patches of ``patch_shape`` from a Volume (and optionally one of its labels).

    Args:
        volume: the image volume (``open_dataset(name)``).
        patch_shape: patch size in voxels (z, y, x).
        seed: base seed; patch ``i`` of epoch ``e`` depends only on (seed, e, i).
        length: patches per epoch (``len(sampler)``).
        label: name of a label of the volume to return with each patch.
        min_foreground: minimum fraction of nonzero label voxels in a patch (needs ``label``).
        align_to_chunks: draw origins on the chunk grid (6-7x faster reads on compressed
            files), moved by up to ``jitter`` voxels per axis.
        max_tries: exact label checks per patch before giving up with an error.
    """

    def __init__(self, volume: Volume, patch_shape: int | tuple[int, ...], *, seed: int = 0, length: int = 1000,
                 label: str | None = None, min_foreground: float = 0.0, align_to_chunks: bool = False,
                 jitter: int | tuple[int, ...] = 0, max_tries: int = 200) -> None:
        self.volume = volume
        self.patch = parse_triple(patch_shape, "patch_shape", 1)
        if any(p > s for p, s in zip(self.patch, volume.shape)):
            raise ConfigError(f"{volume.name}: patch {self.patch} is larger than the volume {volume.shape}")
        self.seed, self.length, self.epoch = int(seed), int(length), 0
        self.align, self.jitter = bool(align_to_chunks), parse_triple(jitter, "jitter", 0)
        self.max_tries = int(max_tries)
        if not 0.0 <= min_foreground <= 1.0:
            raise ConfigError(f"min_foreground must be within [0, 1], got {min_foreground}")
        if min_foreground > 0 and label is None:
            raise ConfigError("min_foreground needs a label name")
        self.label_name = label
        self.label = None
        if label is not None:
            if label not in volume.label_names:
                raise ConfigError(f"{volume.name}: no label {label!r} (labels: {', '.join(volume.label_names) or 'none'})")
            self.label = volume.labels[label]
        self.min_foreground = float(min_foreground)
        self.need = int(np.ceil(self.min_foreground * np.prod(self.patch) - 1e-9))
        self._bound: _ForegroundBound | None = None
        self._spans: tuple[np.ndarray, np.ndarray] | None = None
        if self.need > 0:
            self._prepare_label_bounds()

    def _prepare_label_bounds(self) -> None:
        with hdf5.open_read(self.volume.path) as f:
            stats = f.get(f"{hdf5.LABEL_STATS}/{self.label_name}/chunk_foreground")
            if stats is None:
                raise ConfigError(f"{self.volume.name}: no per-chunk statistics for label {self.label_name!r}; "
                                  "re-run `emdata normalize` to write them")
            counts = stats[()]
        bound = _ForegroundBound(counts, self.label.chunks, self.volume.shape, self.patch)
        totals, positions = bound.all_spans()
        best = int(totals.max())
        if best < self.need:
            raise ConfigError(
                f"{self.volume.name}: no {'x'.join(map(str, self.patch))} patch can have >= "
                f"{self.min_foreground:.1%} {self.label_name}: per-chunk label statistics bound the best patch at "
                f"{best / np.prod(self.patch):.2%}; lower min_foreground or enlarge the patch")
        self._bound = bound
        weights = np.where(totals >= self.need, positions, 0).astype(np.float64).ravel()
        self._spans = (weights / weights.sum(), totals)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _propose(self, rng: np.random.Generator) -> tuple[int, ...]:
        limits = [s - p for s, p in zip(self.volume.shape, self.patch)]
        if self.align:
            origin = []
            for limit, chunk, jitter in zip(limits, self.volume.chunks, self.jitter):
                grid = rng.integers(0, limit // chunk + 1) * chunk
                shift = rng.integers(-jitter, jitter + 1) if jitter else 0
                origin.append(int(np.clip(grid + shift, 0, limit)))
            return tuple(origin)
        if self._spans is None:
            return tuple(int(rng.integers(0, limit + 1)) for limit in limits)
        # Pick a span combination in proportion to its positions, then a position inside it.
        probs, totals = self._spans
        flat = rng.choice(probs.size, p=probs)
        picks = np.unravel_index(flat, totals.shape)
        origin = []
        for axis, pick in enumerate(picks):
            first, last, _ = self._bound.axes[axis]
            chunk, patch, limit = self._bound.chunks[axis], self.patch[axis], limits[axis]
            # positions whose span is (first, last): o // chunk == first and (o + patch - 1) // chunk == last
            lo = max(first[pick] * chunk, last[pick] * chunk - patch + 1, 0)
            hi = min(first[pick] * chunk + chunk - 1, last[pick] * chunk + chunk - patch, limit)
            origin.append(int(rng.integers(lo, hi + 1)))
        return tuple(origin)

    def origin(self, index: int, epoch: int | None = None) -> tuple[int, int, int]:
        """The origin of patch ``index`` (deterministic for seed, epoch, index)."""
        if not 0 <= index < self.length:
            raise AccessError(f"patch index {index} is outside 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
        if self.need == 0:
            return self._propose(rng)
        cheap_rejections = 0
        for _ in range(self.max_tries):
            origin = self._propose(rng)
            if self._bound.of_origin(origin) < self.need:  # cannot pass: skip the read
                cheap_rejections += 1
                if cheap_rejections > 100 * self.max_tries:
                    break
                continue
            fg = np.count_nonzero(self.label.read(origin, self.patch))
            if fg >= self.need:
                return origin
        raise AccessError(f"{self.volume.name}: no patch with >= {self.min_foreground:.1%} {self.label_name} "
                          f"found in {self.max_tries} tries (patch {index}, epoch {self.epoch}); "
                          "such patches are rare: lower min_foreground or raise max_tries")

    def __getitem__(self, index: int) -> Patch:
        origin = self.origin(index)
        raw = self.volume.read(origin, self.patch)
        label = self.label.read(origin, self.patch) if self.label is not None else None
        return Patch(origin, raw, label)

    def __iter__(self):
        return (self[i] for i in range(self.length))


class GridPatches:
    """Sliding-window patches covering the whole volume, with ``overlap`` voxels between neighbours.

    The last window on each axis is moved back to end at the border, so every patch is full-size
    and inside the volume. For validation and evaluation.
    """

    def __init__(self, volume: Volume, patch_shape: int | tuple[int, ...], *, overlap: int | tuple[int, ...] = 0,
                 label: str | None = None) -> None:
        self.volume = volume
        self.patch = parse_triple(patch_shape, "patch_shape", 1)
        self.overlap = parse_triple(overlap, "overlap", 0)
        if any(o >= p for o, p in zip(self.overlap, self.patch)):
            raise ConfigError(f"overlap {self.overlap} must be smaller than the patch {self.patch}")
        if any(p > s for p, s in zip(self.patch, volume.shape)):
            raise ConfigError(f"{volume.name}: patch {self.patch} is larger than the volume {volume.shape}")
        self.label = volume.labels[label] if label is not None else None
        self.starts = []
        for size, patch, overlap in zip(volume.shape, self.patch, self.overlap):
            starts = list(range(0, size - patch + 1, patch - overlap))
            if starts[-1] != size - patch:
                starts.append(size - patch)
            self.starts.append(starts)

    def __len__(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def origin(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < len(self):
            raise AccessError(f"patch index {index} is outside 0..{len(self) - 1}")
        iz, iy, ix = np.unravel_index(index, [len(s) for s in self.starts])
        return self.starts[0][iz], self.starts[1][iy], self.starts[2][ix]

    def __getitem__(self, index: int) -> Patch:
        origin = self.origin(index)
        label = self.label.read(origin, self.patch) if self.label is not None else None
        return Patch(origin, self.volume.read(origin, self.patch), label)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
