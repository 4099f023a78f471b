"""Samplers: reproducible random patches, label feasibility up front, grids (tiled inference: test_tiling)."""

from __future__ import annotations

import numpy as np
import pytest

from emdata.access.sampling import GridPatches, RandomPatches
from emdata.access.volume import Volume
from emdata.errors import AccessError, ConfigError
from emdata.testing.volumes import coordinate_volume, write_canonical

SHAPE = (29, 45, 61)


@pytest.fixture
def arrays():
    raw = coordinate_volume(SHAPE, np.uint8)
    label = np.zeros(SHAPE, np.uint8)
    label[3:13, 20:38, 30:55] = 1  # one dense box of "mitochondria", 5% of the volume
    return raw, label


@pytest.fixture
def voxel_reads(monkeypatch) -> list[str]:
    """The arrays whose voxels were read ("/labels/mito", ...): through Volume (memory-mapped chunks
    or h5py) and through h5py directly."""
    import h5py

    names: list[str] = []
    read_box, getitem = Volume._read_box, h5py.Dataset.__getitem__

    def counted_read_box(self, *args, **kwargs):
        names.append("/" + self.array)
        return read_box(self, *args, **kwargs)

    def counted_getitem(self, *args, **kwargs):
        names.append(self.name)
        return getitem(self, *args, **kwargs)

    monkeypatch.setattr(Volume, "_read_box", counted_read_box)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted_getitem)
    return names


@pytest.fixture
def volume(tmp_path, arrays) -> Volume:
    raw, label = arrays
    return Volume(write_canonical(tmp_path / "v.h5", raw, labels={"mito": label}, chunks=(8, 16, 16)))


def test_random_patches_are_reproducible_and_correct(volume, arrays) -> None:
    raw, _ = arrays
    a = RandomPatches(volume, (7, 9, 11), seed=3, length=20)
    b = RandomPatches(volume, (7, 9, 11), seed=3, length=20)
    origins = [a.origin(i) for i in range(20)]
    assert origins == [b.origin(i) for i in reversed(range(20))][::-1]  # order does not matter
    assert len(set(origins)) > 15
    for i in (0, 7, 19):
        patch = a[i]
        z, y, x = patch.origin
        np.testing.assert_array_equal(patch.raw, raw[z:z + 7, y:y + 9, x:x + 11])
    assert RandomPatches(volume, (7, 9, 11), seed=4, length=20).origin(0) != origins[0]
    a.set_epoch(1)
    assert [a.origin(i) for i in range(20)] != origins


def test_chunk_aligned_patches_with_jitter(volume) -> None:
    sampler = RandomPatches(volume, (8, 16, 16), seed=0, length=50, align_to_chunks=True)
    assert all(o[0] % 8 == 0 and o[1] % 16 == 0 and o[2] % 16 == 0 for o in map(sampler.origin, range(50)))
    jittered = RandomPatches(volume, (8, 16, 16), seed=0, length=50, align_to_chunks=True, jitter=(0, 2, 3))
    offsets = {(o[1] % 16, o[2] % 16) for o in map(jittered.origin, range(50))}
    assert len(offsets) > 1 and all(min(dy, 16 - dy) <= 2 and min(dx, 16 - dx) <= 3 for dy, dx in offsets)


def test_label_aware_patches_meet_the_minimum(volume, arrays) -> None:
    _, label = arrays
    sampler = RandomPatches(volume, (6, 10, 10), seed=1, length=30, label="mito", min_foreground=0.5)
    for i in range(30):
        patch = sampler[i]
        assert np.count_nonzero(patch.label) >= 0.5 * 600
        z, y, x = patch.origin
        np.testing.assert_array_equal(patch.label, label[z:z + 6, y:y + 10, x:x + 10])


def test_infeasible_label_request_fails_at_once(volume, voxel_reads) -> None:
    with pytest.raises(ConfigError, match=r"no 16x32x32 patch can have >= 90.0% mito.*bound the best patch at"):
        RandomPatches(volume, (16, 32, 32), seed=0, label="mito", min_foreground=0.9)
    assert not [n for n in voxel_reads if n.startswith("/labels/")]  # decided from per-chunk statistics alone


def test_rare_patches_give_up_with_a_clear_error(tmp_path) -> None:
    label = np.zeros(SHAPE, np.uint8)
    label[::4, ::4, ::4] = 1  # 1/64 of every chunk: the bound allows 1.5%, no patch reaches it
    vol = Volume(write_canonical(tmp_path / "sparse.h5", coordinate_volume(SHAPE), labels={"m": label}))
    sampler = RandomPatches(vol, (4, 4, 4), label="m", min_foreground=0.02, max_tries=20)
    with pytest.raises(AccessError, match="found in 20 tries"):
        sampler.origin(0)


def test_grid_patches_cover_with_overlap(volume, arrays) -> None:
    raw, _ = arrays
    grid = GridPatches(volume, (10, 20, 25), overlap=(2, 5, 5))
    cover = np.zeros(SHAPE, bool)
    for i in range(len(grid)):
        patch = grid[i]
        z, y, x = patch.origin
        np.testing.assert_array_equal(patch.raw, raw[z:z + 10, y:y + 20, x:x + 25])
        cover[z:z + 10, y:y + 20, x:x + 25] = True
    assert cover.all()
    assert grid.starts[0] == [0, 8, 16, 19]


def test_label_with_its_own_chunking(tmp_path, arrays) -> None:
    """Span proposals use the label's chunk grid, which need not be the image's."""
    import h5py

    raw, label = arrays
    path = write_canonical(tmp_path / "mixed.h5", raw, labels={"mito": label}, chunks=(8, 16, 16))
    with h5py.File(path, "r+") as f:  # re-chunk the label (5, 11, 13) and rewrite its statistics
        del f["labels/mito"], f["label_stats/mito/chunk_foreground"]
        f.create_dataset("labels/mito", data=label, chunks=(5, 11, 13))
        for key in ("resolution", "offset"):  # canonical files give labels their geometry
            f["labels/mito"].attrs[key] = f["raw"].attrs[key]
        grid = [-(-s // c) for s, c in zip(SHAPE, (5, 11, 13))]
        counts = np.zeros(grid, np.int64)
        for index in np.ndindex(*grid):
            box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, (5, 11, 13)))
            counts[index] = np.count_nonzero(label[box])
        f.create_dataset("label_stats/mito/chunk_foreground", data=counts)
    sampler = RandomPatches(Volume(path), (6, 10, 10), seed=2, length=40, label="mito", min_foreground=0.6)
    rng = np.random.default_rng(0)
    proposals = [sampler._propose(rng) for _ in range(500)]
    assert all(sampler._bound.of_origin(o) >= sampler.need for o in proposals)  # only promising spans
    for i in range(40):
        assert np.count_nonzero(sampler[i].label) >= 360


# --- chunk-aligned, label-aware sampling: odd shapes and chunkings ------------------------------

ODD = (37, 53, 71)
ODD_CHUNKS = (5, 11, 13)


def _rechunk_label(path, name: str, label: np.ndarray, chunks: tuple[int, int, int]) -> None:
    """Store ``label`` with its own chunking and rewrite its per-chunk statistics to match."""
    import h5py

    with h5py.File(path, "r+") as f:
        del f[f"labels/{name}"], f[f"label_stats/{name}/chunk_foreground"]
        f.create_dataset(f"labels/{name}", data=label, chunks=chunks)
        for key in ("resolution", "offset"):  # canonical files give labels their geometry
            f[f"labels/{name}"].attrs[key] = f["raw"].attrs[key]
        grid = [-(-s // c) for s, c in zip(label.shape, chunks)]
        counts = np.zeros(grid, np.int64)
        for index in np.ndindex(*grid):
            box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))
            counts[index] = np.count_nonzero(label[box])
        f.create_dataset(f"label_stats/{name}/chunk_foreground", data=counts)


@pytest.mark.parametrize("label_chunks", [None, (7, 9, 10)])
@pytest.mark.parametrize("jitter", [0, (1, 1, 1)])
def test_aligned_label_patches_are_found_whenever_the_bound_allows(tmp_path, jitter, label_chunks) -> None:
    """One dense 6x12x14 box sits exactly on the image chunk grid: few aligned origins can reach 90%.

    Of the aligned origins the per-chunk bound allows, 6-100% pass the exact count here (a larger
    jitter dilutes that: the bound cannot tell jittered origins within one chunk span apart)."""
    label = np.zeros(ODD, np.uint8)
    label[10:16, 22:34, 26:40] = 1
    path = write_canonical(tmp_path / "odd.h5", coordinate_volume(ODD), labels={"m": label}, chunks=ODD_CHUNKS)
    if label_chunks is not None:
        _rechunk_label(path, "m", label, label_chunks)
    vol = Volume(path)
    patch = (6, 12, 14)
    jit = (jitter,) * 3 if isinstance(jitter, int) else jitter
    a = RandomPatches(vol, patch, seed=5, length=10, label="m", min_foreground=0.9, align_to_chunks=True,
                      jitter=jitter)
    b = RandomPatches(vol, patch, seed=5, length=10, label="m", min_foreground=0.9, align_to_chunks=True,
                      jitter=jitter)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        origins = [a.origin(i) for i in range(10)]  # all ten are found: none raises
        assert origins == [b.origin(i) for i in reversed(range(10))][::-1]  # deterministic per (seed, e, i)
        for o in origins:
            for axis in range(3):  # within the jitter of a point of the image chunk grid
                off = o[axis] % ODD_CHUNKS[axis]
                assert min(off, ODD_CHUNKS[axis] - off) <= jit[axis], (o, axis)
            box = tuple(slice(s, s + p) for s, p in zip(o, patch))
            assert np.count_nonzero(label[box]) >= a.need
    patch_0 = a[0]
    assert np.count_nonzero(patch_0.label) >= a.need


def test_aligned_rare_patches_spend_the_budget_on_exact_checks_only(tmp_path) -> None:
    """The bound allows 90% at a few aligned origins but no patch reaches it: every try is a real check."""
    label = np.zeros(ODD, np.uint8)
    label[11:17, 23:35, 27:41] = 1  # one voxel off the chunk grid on every axis: aligned best is 71%
    vol = Volume(write_canonical(tmp_path / "off.h5", coordinate_volume(ODD), labels={"m": label},
                                 chunks=ODD_CHUNKS))
    sampler = RandomPatches(vol, (6, 12, 14), seed=0, label="m", min_foreground=0.9, align_to_chunks=True,
                            max_tries=25)
    reads = []
    read = sampler.label.read
    sampler.label.read = lambda *args, **kw: reads.append(1) or read(*args, **kw)
    with pytest.raises(AccessError) as caught:
        sampler.origin(3)
    assert len(reads) == 25  # cheap rejections do not use up the budget
    message = str(caught.value)
    assert "\n" not in message
    for part in ("6x12x14", ">= 90.0% m", "found in 25 tries", "patch 3", "max_tries", "min_foreground"):
        assert part in message, (part, message)


def test_aligned_request_no_aligned_patch_can_meet_fails_at_once(tmp_path, voxel_reads) -> None:
    """Foreground straddling a chunk boundary is reachable unaligned but not by aligned 4x8x10 patches."""
    label = np.zeros(ODD, np.uint8)
    label[3:7, 8:16, 9:19] = 1  # crosses the z, y and x chunk boundaries (5, 11, 13)
    vol = Volume(write_canonical(tmp_path / "cross.h5", coordinate_volume(ODD), labels={"m": label},
                                 chunks=ODD_CHUNKS))
    RandomPatches(vol, (4, 8, 10), label="m", min_foreground=0.9)  # feasible without alignment
    voxel_reads.clear()
    with pytest.raises(ConfigError, match=r"chunk-aligned.*jitter.*align_to_chunks=False"):
        RandomPatches(vol, (4, 8, 10), label="m", min_foreground=0.9, align_to_chunks=True)
    assert not [n for n in voxel_reads if n.startswith("/labels/")]  # decided from per-chunk statistics alone
