"""Patch samplers: seeded random patches (optionally label-aware) and sliding-window grids.

Reproducibility: patch ``i`` of epoch ``e`` comes from its own random stream,
``numpy.random.default_rng([seed, e, i])``, so it is the same in any process, in any order, with
any number of DataLoader workers.

Label-aware sampling uses the per-chunk foreground counts written by ``normalize``
(``/label_stats/<label>/chunk_foreground``). A patch can hold no more foreground than the chunks
it overlaps, so before drawing anything the sampler bounds every origin it could draw (every
position, or with ``align_to_chunks`` the chunk-grid points moved by up to ``jitter``) with a
summed-area table: a request no drawable patch can satisfy fails at once, with the best achievable
fraction in the message. Candidates are then drawn only among drawable origins whose bound allows
the requested fraction (with the probabilities they have without a label, restricted to those), so
every try is an exact check on the label voxels and ``max_tries`` counts only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emdata.errors import AccessError, ConfigError
from emdata.access.blocks import parse_triple, triple
from emdata.access.deprecation import Alias
from emdata.access.volume import Volume


@dataclass
class Patch:
    """One sampled patch: ``origin`` is its first voxel (z, y, x) in the volume it was cut from."""

    origin: tuple[int, int, int]
    raw: np.ndarray
    label: np.ndarray | None = None


def _axis_candidates(size: int, patch: int, grid: int, jitter: int, align: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per axis: the origins a sampler can draw and their probabilities (summing to 1).

    Unaligned, every origin in ``0..size - patch`` is equally likely. Aligned, a point of the chunk
    grid (step ``grid``) is drawn, moved by a uniform shift in ``-jitter..jitter`` and clipped into
    the volume, exactly as ``RandomPatches._propose`` does without a label.
    """
    limit = size - patch
    if not align:
        return np.arange(limit + 1), np.full(limit + 1, 1.0 / (limit + 1))
    points = np.arange(limit // grid + 1) * grid
    moved = np.clip(points[:, None] + np.arange(-jitter, jitter + 1)[None, :], 0, limit).ravel()
    counts = np.bincount(moved, minlength=limit + 1)
    origins = np.flatnonzero(counts)
    return origins, counts[origins] / moved.size


class _AxisSpans:
    """One axis's candidate origins grouped by span: the (first, last) label chunk a patch overlaps."""

    def __init__(self, origins: np.ndarray, probs: np.ndarray, patch: int, chunk: int) -> None:
        spans = np.stack([origins // chunk, (origins + patch - 1) // chunk], axis=1)
        unique, inverse = np.unique(spans, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        self.first, self.last = unique[:, 0], unique[:, 1]
        self.weight = np.bincount(inverse, weights=probs, minlength=len(unique))
        self.members = []  # per span: its origins and their cumulative probabilities within it
        for group in range(len(unique)):
            mine = inverse == group
            cdf = np.cumsum(probs[mine])
            self.members.append((origins[mine], cdf / cdf[-1]))

    def draw(self, group: int, u: float) -> int:
        origins, cdf = self.members[group]
        return int(origins[min(int(np.searchsorted(cdf, u, side="right")), len(origins) - 1)])


class _ForegroundBound:
    """Upper bounds on a patch's foreground voxels, from per-chunk counts (summed-area table)."""

    def __init__(self, counts: np.ndarray, chunks: tuple[int, ...], patch: tuple[int, ...]) -> None:
        self.chunks = chunks
        self.patch_shape = patch
        table = np.zeros(tuple(n + 1 for n in counts.shape), np.int64)
        table[1:, 1:, 1:] = counts.cumsum(0).cumsum(1).cumsum(2)
        self.table = table

    def box_sum(self, lo: tuple[np.ndarray, ...], hi: tuple[np.ndarray, ...]) -> np.ndarray:
        """Sum of counts over chunk boxes [lo, hi] (inclusive), broadcasting over the inputs."""
        t = self.table
        (z0, y0, x0), (z1, y1, x1) = lo, tuple(h + 1 for h in hi)
        return (t[z1, y1, x1] - t[z0, y1, x1] - t[z1, y0, x1] - t[z1, y1, x0]
                + t[z0, y0, x1] + t[z0, y1, x0] + t[z1, y0, x0] - t[z0, y0, x0])

    def over(self, axes: list[_AxisSpans]) -> np.ndarray:
        """The bound for every combination of per-axis spans (shape: spans per axis)."""
        z, y, x = axes
        lo = (z.first[:, None, None], y.first[None, :, None], x.first[None, None, :])
        hi = (z.last[:, None, None], y.last[None, :, None], x.last[None, None, :])
        return self.box_sum(lo, hi)

    def of_origin(self, origin: tuple[int, ...]) -> int:
        lo = tuple(np.int64(o // c) for o, c in zip(origin, self.chunks))
        hi = tuple(np.int64((o + p - 1) // c) for o, p, c in zip(origin, self.patch_shape, self.chunks))
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
        align_to_chunks: draw origins on the image's chunk grid (6-7x faster reads on compressed
            files), moved by up to ``jitter`` voxels per axis (and clipped into the volume). With
            ``min_foreground``, only aligned origins whose per-chunk bound allows it are drawn; if
            there are none, the constructor says so (add jitter or turn alignment off).
        max_tries: exact label checks per patch before giving up with an error. Origins the
            per-chunk bound rules out are never drawn, so every try is an exact check; running
            out means patches that pass the bound rarely pass the exact count.

    Raises:
        ConfigError: at construction, when no drawable patch can reach ``min_foreground`` by the
            per-chunk statistics (or they are missing).
        AccessError: from ``origin``/``[]``, when ``max_tries`` exact checks all fall short.
    """

    patch = Alias("patch_shape")  # the old name, deprecated

    def __init__(self, volume: Volume, patch_shape: int | tuple[int, ...], *, seed: int = 0, length: int = 1000,
                 label: str | None = None, min_foreground: float = 0.0, align_to_chunks: bool = False,
                 jitter: int | tuple[int, ...] = 0, max_tries: int = 200) -> None:
        self.volume = volume
        self.patch_shape = parse_triple(patch_shape, "patch_shape", 1)
        if any(p > s for p, s in zip(self.patch_shape, volume.shape)):
            raise ConfigError(f"{volume.name}: patch {self.patch_shape} is larger than the volume {volume.shape}")
        self.seed, self.length, self.epoch = int(seed), int(length), 0
        self.align, self.jitter = bool(align_to_chunks), parse_triple(jitter, "jitter", 0)
        self.max_tries = int(max_tries)
        if self.max_tries < 1:
            raise ConfigError(f"max_tries must be at least 1, got {max_tries}")
        if not 0.0 <= min_foreground <= 1.0:
            raise ConfigError(f"min_foreground must be within [0, 1], got {min_foreground}")
        if min_foreground > 0 and label is None:
            raise ConfigError("min_foreground needs a label name")
        self.label_name = label
        self.label: Volume | None = None
        if label is not None:  # shares the volume's open file: a patch's image and label are one version
            if label not in volume.label_names:
                raise ConfigError(f"{volume.name}: no label {label!r} (labels: {', '.join(volume.label_names) or 'none'})")
            self.label = volume.labels[label]
        self.min_foreground = float(min_foreground)
        self.need = int(np.ceil(self.min_foreground * np.prod(self.patch_shape) - 1e-9))
        self._bound: _ForegroundBound | None = None
        self._draw: tuple[np.ndarray, np.ndarray, tuple[int, ...], list[_AxisSpans]] | None = None
        if self.need > 0:
            self._prepare_label_bounds()

    def _label(self) -> Volume:
        assert self.label is not None, "only label-aware sampling asks for the label"
        return self.label

    def _axes(self, align: bool) -> list[_AxisSpans]:
        return [_AxisSpans(*_axis_candidates(size, patch, grid, jitter, align), patch, chunk)
                for size, patch, grid, jitter, chunk in zip(self.volume.shape, self.patch_shape, self.volume.chunks,
                                                            self.jitter, self._label().chunks)]

    def _prepare_label_bounds(self) -> None:
        """Bound every drawable origin's foreground; keep the distribution over those that can pass."""
        # Through the label's storage: the statistics of the very version its voxels come from.
        counts = self._label().chunk_foreground()
        if counts is None:
            raise ConfigError(f"{self.volume.name}: no per-chunk statistics for label {self.label_name!r}; "
                              "re-run `emdata normalize` to write them")
        bound = _ForegroundBound(counts, self._label().chunks, self.patch_shape)
        size, shape = np.prod(self.patch_shape), "x".join(map(str, self.patch_shape))
        anywhere = int(bound.over(self._axes(False)).max())
        if anywhere < self.need:
            raise ConfigError(
                f"{self.volume.name}: no {shape} patch can have >= "
                f"{self.min_foreground:.1%} {self.label_name}: per-chunk label statistics bound the best patch at "
                f"{anywhere / size:.2%}; lower min_foreground or enlarge the patch")
        axes = self._axes(True) if self.align else self._axes(False)
        totals = bound.over(axes)
        best = int(totals.max())
        if best < self.need:
            raise ConfigError(
                f"{self.volume.name}: no chunk-aligned {shape} patch (jitter {'x'.join(map(str, self.jitter))}) "
                f"can have >= {self.min_foreground:.1%} {self.label_name}: per-chunk label statistics bound the "
                f"best aligned patch at {best / size:.2%} ({anywhere / size:.2%} unaligned); add jitter, set "
                "align_to_chunks=False or lower min_foreground")
        z, y, x = (a.weight for a in axes)
        weights = z[:, None, None] * y[None, :, None] * x[None, None, :]
        feasible = np.flatnonzero(totals >= self.need)
        cdf = np.cumsum(weights.ravel()[feasible])
        self._bound = bound
        self._draw = (feasible, cdf / cdf[-1], totals.shape, axes)

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _propose(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """A candidate origin: with a foreground minimum, only one the per-chunk bound allows."""
        limits = [s - p for s, p in zip(self.volume.shape, self.patch_shape)]
        if self._draw is not None:
            # A span combination by its probability among the feasible ones, then an origin inside it.
            feasible, cdf, shape, axes = self._draw
            pick = feasible[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(feasible) - 1)]
            return triple(axis.draw(int(group), rng.random())
                          for axis, group in zip(axes, np.unravel_index(pick, shape)))
        if self.align:
            origin = []
            for limit, chunk, jitter in zip(limits, self.volume.chunks, self.jitter):
                grid = rng.integers(0, limit // chunk + 1) * chunk
                shift = rng.integers(-jitter, jitter + 1) if jitter else 0
                origin.append(int(np.clip(grid + shift, 0, limit)))
            return triple(origin)
        return triple(int(rng.integers(0, limit + 1)) for limit in limits)

    def origin(self, index: int, epoch: int | None = None) -> tuple[int, int, int]:
        """The origin of patch ``index`` (deterministic for seed, epoch, index).

        With ``min_foreground``, up to ``max_tries`` candidates (all allowed by the per-chunk bound)
        are checked exactly on the label; ``AccessError`` if none has enough foreground.
        """
        if not 0 <= index < self.length:
            raise AccessError(f"patch index {index} is outside 0..{self.length - 1}")
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.need == 0:
            return self._propose(rng)
        best = 0
        for _ in range(self.max_tries):
            origin = self._propose(rng)
            fg = int(np.count_nonzero(self._label().read(origin, self.patch_shape)))
            if fg >= self.need:
                return origin
            best = max(best, fg)
        aligned = "; or set align_to_chunks=False" if self.align else ""
        raise AccessError(
            f"{self.volume.name}: no {'x'.join(map(str, self.patch_shape))} patch with >= {self.min_foreground:.1%} "
            f"{self.label_name} found in {self.max_tries} tries (patch {index}, epoch {epoch}; every try passed the "
            f"per-chunk bound, the best had {best / np.prod(self.patch_shape):.1%}): such patches are rare, lower "
            f"min_foreground, enlarge patch_shape or raise max_tries{aligned}")

    def __getitem__(self, index: int) -> Patch:
        origin = self.origin(index)
        raw = self.volume.read(origin, self.patch_shape)
        label = self.label.read(origin, self.patch_shape) if self.label is not None else None
        return Patch(origin, raw, label)

    def __iter__(self):
        return (self[i] for i in range(self.length))


class GridPatches:
    """Sliding-window patches covering the whole volume, with ``overlap`` voxels between neighbours.

    The last window on each axis is moved back to end at the border, so every patch is full-size
    and inside the volume. For validation and evaluation. ``patch_shape`` and ``overlap`` are in
    voxels (z, y, x); a patch's ``origin`` is its first voxel.
    """

    patch = Alias("patch_shape")  # the old name, deprecated

    def __init__(self, volume: Volume, patch_shape: int | tuple[int, ...], *, overlap: int | tuple[int, ...] = 0,
                 label: str | None = None) -> None:
        self.volume = volume
        self.patch_shape = parse_triple(patch_shape, "patch_shape", 1)
        self.overlap = parse_triple(overlap, "overlap", 0)
        if any(o >= p for o, p in zip(self.overlap, self.patch_shape)):
            raise ConfigError(f"overlap {self.overlap} must be smaller than the patch {self.patch_shape}")
        if any(p > s for p, s in zip(self.patch_shape, volume.shape)):
            raise ConfigError(f"{volume.name}: patch {self.patch_shape} is larger than the volume {volume.shape}")
        self.label_name = label
        self.label = volume.labels[label] if label is not None else None
        self.starts = []
        for size, patch, overlap in zip(volume.shape, self.patch_shape, self.overlap):
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
        label = self.label.read(origin, self.patch_shape) if self.label is not None else None
        return Patch(origin, self.volume.read(origin, self.patch_shape), label)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
