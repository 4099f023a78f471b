"""core/boxes: the one box type and the grids that cut shapes into boxes."""

from __future__ import annotations

import json

from emdata.core.boxes import Box, Grid


def test_a_grid_cuts_a_shape_in_c_order_with_clipped_edges() -> None:
    grid = Grid((3, 5, 7), (2, 5, 3))
    assert grid.counts == (2, 1, 3) and len(grid) == 6
    cells = grid.cells()
    assert [index for index, _ in cells] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0), (1, 0, 1), (1, 0, 2)]
    assert cells[2][1] == ((0, 0, 6), (2, 5, 7)) and cells[-1][1].shape == (1, 5, 1)
    assert sum(box.voxels for box in grid.boxes()) == 3 * 5 * 7


def test_a_box_is_a_plain_start_stop_pair() -> None:
    box = Box((1, 2, 3), (4, 6, 8))
    start, stop = box
    assert (start, stop) == ((1, 2, 3), (4, 6, 8)) and box == ((1, 2, 3), (4, 6, 8))
    assert json.loads(json.dumps(box)) == [[1, 2, 3], [4, 6, 8]]
    assert box.shape == (3, 4, 5) and box.shifted((10, 0, -1)) == ((11, 2, 2), (14, 6, 7))


def test_a_grid_is_iterated_lazily_and_names_the_cells_a_box_touches() -> None:
    grid = Grid((10, 10, 10), (4, 4, 4))
    first = next(iter(grid))
    assert first == ((0, 0, 0), ((0, 0, 0), (4, 4, 4))) and grid.cell((2, 2, 2)) == ((8, 8, 8), (10, 10, 10))
    assert grid.touched(Box((3, 4, 0), (5, 8, 1))) == [(0, 1, 0), (1, 1, 0)]
    assert grid.touched(Box((-5, 0, 8), (2, 1, 20))) == [(0, 0, 2)]  # clipped to the grid
    assert grid.touched(Box((4, 4, 4), (4, 8, 8))) == []  # empty, on a cell boundary
