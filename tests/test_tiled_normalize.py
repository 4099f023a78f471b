"""normalize under a memory budget: chunk-aligned tiles, a C-order hash pass, little-endian output."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from emdata.h5 import hdf5
from emdata.stages.normalize.write import write_volume
from emdata.formats.raw import ArrayVolume
from emdata.testing.volumes import coordinate_volume
from emdata.core.boxes import IN_FLIGHT, plan_tiles


def _write(path, array, budget, chunks=(4, 8, 16), label=False):
    with h5py.File(path, "w") as f:
        result = write_volume(f, "raw", ArrayVolume(array, "t"), chunks=chunks, compression="none", level=3,
                              attrs=hdf5.spatial_attrs((1, 1, 1), (0, 0, 0)), label=label, desc="t", budget=budget)
        return result, f["raw"][()], f["raw"].dtype, json.loads(f["raw"].attrs["statistics"])


@pytest.mark.parametrize("budget", [1 << 30, 4 * 4 * 8 * 53 * 2 * IN_FLIGHT, 4 * 8 * 16 * 2 * IN_FLIGHT, 1])
def test_any_budget_gives_the_same_voxels_hash_and_statistics(tmp_path, budget) -> None:
    """From one slab per tile down to one chunk per tile: identical results (odd shape, uint16)."""
    array = coordinate_volume((11, 37, 53), np.uint16)
    result, stored, dtype, stats = _write(tmp_path / "a.h5", array, budget)
    np.testing.assert_array_equal(stored, array)
    assert result["array_sha256"] == hashlib.sha256(array.astype("<u2").tobytes()).hexdigest()
    assert stats["mean"] == array.mean() and stats["percentiles"]["p99.9"] == np.percentile(array, 99.9)
    assert result["one_pass"] == (budget == 1 << 30)


def test_big_endian_input_is_stored_little_endian_with_value_statistics(tmp_path) -> None:
    values = coordinate_volume((5, 17, 23), np.uint16)
    result, stored, dtype, stats = _write(tmp_path / "b.h5", values.astype(">u2"), 1 << 30)
    assert dtype == np.dtype("<u2")
    np.testing.assert_array_equal(stored, values)
    assert stats["min"] == values.min() and stats["max"] == values.max() and stats["mean"] == values.mean()
    assert result["array_sha256"] == hashlib.sha256(values.astype("<u2").tobytes()).hexdigest()


def test_label_chunk_counts_are_the_same_tiled_or_not(tmp_path) -> None:
    mask = (coordinate_volume((9, 30, 41)) % 5 == 0).astype(np.uint8)
    whole, *_ = _write(tmp_path / "w.h5", mask, 1 << 30, label=True)
    tiled, *_ = _write(tmp_path / "t.h5", mask, 1, label=True)
    np.testing.assert_array_equal(whole["foreground"], tiled["foreground"])
    assert whole["foreground"].sum() == np.count_nonzero(mask)


@pytest.mark.parametrize("shape", [(16, 5500, 5496), (512, 2048, 2048), (1065, 1536, 2048)])
def test_tiles_respect_the_budget_and_are_chunk_aligned(shape) -> None:
    budget = 256 << 20
    chunks = tuple(min(64, s) for s in shape)
    plan = plan_tiles(shape, chunks, 1, budget)
    assert plan.tile_bytes <= budget // IN_FLIGHT
    covered = 0
    for start, stop in plan.tiles:
        assert all(a % c == 0 for a, c in zip(start, chunks))
        assert all(b % c == 0 or b == n for b, c, n in zip(stop, chunks, shape))
        assert np.prod([b - a for a, b in zip(start, stop)]) <= budget // IN_FLIGHT
        covered += int(np.prod([b - a for a, b in zip(start, stop)]))
    assert covered == int(np.prod(shape))
    boxes = plan.hash_boxes or plan.tiles
    assert sum(int(np.prod([b - a for a, b in zip(*box)])) for box in boxes) == int(np.prod(shape))
    flat = [(s[0], s[1]) for s, _ in boxes]
    assert flat == sorted(flat)  # C order: planes, then rows


def test_reading_a_tiff_box_does_not_import_the_network_or_the_registry() -> None:
    code = ("import sys, emdata.formats.tiff, emdata.formats.raw, emdata.core.geometry; "
            "print(sorted(m for m in ('requests', 'urllib3', 'emdata.sources', 'emdata.transport.client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16])
def test_mapped_label_values(dtype) -> None:
    from emdata.formats.raw import MappedVolume

    native = (coordinate_volume((3, 5, 7), np.uint8) % 4).astype(dtype) * 3  # values 0, 3, 6, 9
    mapped = MappedVolume(ArrayVolume(native, "t"), {3: 1, 9: -1 if np.dtype(dtype).kind == "i" else 2})
    got = mapped[:]
    expected = native.copy()
    expected[native == 3] = 1
    expected[native == 9] = -1 if np.dtype(dtype).kind == "i" else 2
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == native.dtype
