"""Label layers of a precomputed image: the label scale on the image's grid, and the voxels both hold.

Precomputed voxel coordinates are absolute (``voxel_offset`` only says where a scale's data
begins), so two scales of the same resolution share one grid: voxel i of one is voxel i of the
other. A label layer is on the image scale's grid when it has a scale of that resolution; a crop
is readable from both when it lies inside both scales' bounds. Every mismatch is one
:class:`~emdata.errors.FormatError` naming both grids (URL, scale key, resolution, voxel bounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emdata.core.boxes import Box, IntTriple
from emdata.errors import FormatError
from emdata.formats.precomputed import Layer, Scale


@dataclass(frozen=True)
class LabelGrid:
    """A label layer and its scale on the image's grid."""

    name: str
    layer: Layer
    scale: Scale

    @property
    def store(self) -> str:
        return label_store(self.name)

    @property
    def scale_url(self) -> str:
        return f"{self.layer.url}/{self.scale.key}"


def label_store(name: str) -> str:
    return f"labels/{name}.zarr"


def describe_grid(layer: Layer, scale: Scale) -> str:
    res = " x ".join(f"{r:g}" for r in scale.resolution)
    return (f"{layer.url} scale {scale.key} ({res} nm, voxels {list(scale.voxel_offset)}..{list(scale.stop)}, "
            "z, y, x)")


def bounds(scale: Scale) -> Box:
    return Box(scale.voxel_offset, scale.stop)


def label_grid(name: str, label: Layer, image: Layer, scale: Scale, dataset: str) -> LabelGrid:
    """The label's scale at the image scale's resolution, or a one-line FormatError naming both grids."""
    if np.dtype(label.data_type).kind not in "iu":
        raise FormatError(dataset, f"{label.url}/info", f"label {name!r} has data_type {label.data_type}, not "
                          "integer ids", "choose a segmentation layer")
    for candidate in label.scales:
        if all(abs(a - b) <= 1e-6 * max(a, b) for a, b in zip(candidate.resolution, scale.resolution)):
            return LabelGrid(name, label, candidate)
    have = "; ".join(describe_grid(label, s) for s in label.scales)
    raise FormatError(dataset, f"{label.url}/info", f"label {name!r} has no scale on the image's grid "
                      f"{describe_grid(image, scale)} (its grids: {have})",
                      "choose a label layer with a scale at the image's resolution")


def labels_inside(grids: list[LabelGrid], image: Layer, scale: Scale, size: IntTriple, dataset: str) -> Box:
    """The voxels every layer holds; a FormatError naming both grids when the crop cannot fit in them."""
    lo, hi = list(scale.voxel_offset), list(scale.stop)
    for grid in grids:
        lo = [max(a, b) for a, b in zip(lo, grid.scale.voxel_offset)]
        hi = [min(a, b) for a, b in zip(hi, grid.scale.stop)]
        if any(b - a < c for a, b, c in zip(lo, hi, size)):
            raise FormatError(dataset, f"{grid.layer.url}/info",
                              f"label {grid.name!r} on {describe_grid(grid.layer, grid.scale)} "
                              f"and the image on {describe_grid(image, scale)} share no {list(size)} box",
                              "choose a label layer covering the image, or a smaller crop_size")
    return Box(tuple(lo), tuple(hi))  # type: ignore[arg-type]


def contains(outer: Box, inner: Box) -> bool:
    return all(a <= b for a, b in zip(outer.start, inner.start)) and all(b <= a for a, b in zip(outer.stop, inner.stop))


def check_crop_inside(grid: LabelGrid, image: Layer, scale: Scale, box: Box, dataset: str) -> None:
    """A crop (absolute voxels of ``scale``) inside the label's bounds, or a FormatError naming both grids."""
    if not contains(bounds(grid.scale), box):
        raise FormatError(dataset, f"{grid.layer.url}/info", f"the crop {list(box.start)}..{list(box.stop)} "
                          f"(z, y, x) of the image on {describe_grid(image, scale)} leaves label {grid.name!r} "
                          f"on {describe_grid(grid.layer, grid.scale)}",
                          "choose roi_start inside both layers, or another label layer")
