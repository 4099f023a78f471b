"""Label overlays and the intensity histogram of the summary: what is drawn, and the same bytes every time."""

from __future__ import annotations

import io

import h5py
import numpy as np
from PIL import Image

from emdata.stages.overlays import (
    PALETTE,
    SEMANTIC_ALPHA,
    HISTOGRAM_SIZE,
    histogram_png,
    instance_colours,
    label_census,
    label_sections,
    overlay_png,
    overlay_rgb,
)

BIG = np.uint64(2**63 + 5)  # a body id beyond int64: colours and counts must not wrap


def test_a_semantic_mask_is_a_tinted_fill_and_the_rest_stays_grey() -> None:
    grey = np.full((6, 8), 100, dtype=np.uint8)
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[2:4, 2:6] = 1
    mask[5, 7] = 2
    rgb = overlay_rgb(grey, mask, instance=False).astype(np.float64)
    assert (rgb[mask == 0] == 100).all()
    expected = (1 - SEMANTIC_ALPHA) * 100 + SEMANTIC_ALPHA * PALETTE
    assert np.allclose(rgb[3, 3], expected[0].round()) and np.allclose(rgb[5, 7], expected[1].round())


def test_instances_are_coloured_regions_with_outlines_in_their_own_colour() -> None:
    grey = np.full((9, 9), 50, dtype=np.uint8)
    ids = np.zeros((9, 9), dtype=np.uint64)
    ids[1:8, 1:5] = BIG
    ids[1:8, 5:8] = 7
    rgb = overlay_rgb(grey, ids, instance=True)
    colours = instance_colours(np.array([BIG, 7], dtype=np.uint64)).round()
    assert not np.allclose(colours[0], colours[1])
    assert np.allclose(rgb[1, 2], colours[0]) and np.allclose(rgb[4, 4], colours[0])  # outline: full colour
    assert not np.allclose(rgb[4, 2], colours[0]) and (rgb[4, 2] != 50).any()  # inside: a tint
    assert np.allclose(rgb[4, 5], colours[1])  # where the two objects touch, each is outlined
    assert (rgb[0] == 50).all()


def test_overlay_png_has_the_size_asked_and_the_same_bytes_every_time() -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (40, 60), dtype=np.uint8)
    ids = np.repeat(np.arange(6, dtype=np.uint64), 400).reshape(40, 60)
    first, second = overlay_png(grey, ids, (90, 60)), overlay_png(grey, ids, (90, 60))
    assert first == second
    assert Image.open(io.BytesIO(first)).size == (90, 60)


def test_histogram_shows_bars_and_the_display_window() -> None:
    values = np.concatenate([np.full(100, 10.0), np.full(50, 200.0)])
    png = histogram_png(values, (10.0, 100.0))
    assert png == histogram_png(values, (10.0, 100.0))
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.shape == (HISTOGRAM_SIZE[1], HISTOGRAM_SIZE[0], 3)
    assert (image[1, 0] == (60, 60, 60)).all()  # the tallest bar reaches the top
    assert (image[-1, -1] == (60, 60, 60)).all() and (image[1, -1] == 255).all()  # half as tall
    assert (image[1, 100] == (225, 235, 250)).all() and (image[1, 200] == 255).all()  # window shaded


def test_label_sections_and_census_read_the_processed_file(tmp_path) -> None:
    path = tmp_path / "v.h5"
    mask = np.zeros((5, 6, 7), dtype=np.uint8)
    mask[0, 0, 0], mask[4, 5, 6] = 3, 1
    ids = np.zeros((5, 6, 7), dtype=np.uint64)
    ids[:2], ids[3:, :3], ids[3:, 3:] = BIG, 9, 11
    with h5py.File(path, "w") as f:
        f.create_dataset("labels/cells", data=ids, chunks=(2, 6, 7))
        f.create_dataset("labels/mask", data=mask, chunks=(2, 3, 7))
    assert label_census(path, "mask") == "2 classes: values 1, 3"
    assert label_census(path, "cells") == "3 objects"
    sections = label_sections(path)
    assert list(sections) == ["cells", "mask"]
    assert (sections["cells"][0] == ids[2]).all() and (sections["cells"][1] == ids[:, 3, :]).all()
