"""An OME-Zarr image and its labels at one level, in a box: what a copy of it must hold, checked.

Pure functions on metadata objects (container-relative key -> bytes, None when absent), no I/O:
the same checks run on the service's objects before a fetch copies any chunk and on the local
copy before normalize reads it. :func:`select` parses the image group's ``multiscales``, chooses
the level, places the region of interest in its voxels (:func:`voxel_box`), and checks that every
label group has that level on the image's voxel grid, holds the region, and is integer. The
metadata is parsed by :mod:`emdata.formats.ngff`; the voxels are read by :mod:`emdata.formats.zarr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from emdata.core.boxes import Box
from emdata.errors import ConfigError, FormatError
from emdata.formats.ngff import ArrayInfo, Level, Multiscale, parse_json, parse_multiscales, parse_zarray, same_grid

Triple = tuple[float, float, float]
Missing = Callable[[str, str], Exception]  # (key, what is missing) -> the error to raise


class Region(Protocol):
    """A box of the chosen level: ``unit`` ``voxel`` (its voxels) or ``nm`` (the image's physical frame)."""

    @property
    def start(self) -> Triple: ...

    @property
    def shape(self) -> Triple: ...

    @property
    def unit(self) -> str: ...


class Wanted(Protocol):
    """What a dataset asks for: groups inside the container, a level, a region (None: the whole level)."""

    @property
    def image(self) -> str: ...

    @property
    def level(self) -> str: ...

    @property
    def labels(self) -> dict[str, str]: ...  # name -> label group

    @property
    def roi(self) -> Region | None: ...

    def url(self, key: str = "") -> str: ...


def voxel_box(wanted: Wanted, level: Level, shape: tuple[int, int, int], dataset: str) -> Box:
    """The ROI in voxels of the level, or a ConfigError naming the key when it is not inside it."""
    roi = wanted.roi
    key = f"datasets.{dataset}.source.{'roi_nm' if roi and roi.unit == 'nm' else 'roi'}"
    if roi is None:
        return Box((0, 0, 0), shape)
    if roi.unit == "voxel":
        start = tuple(int(v) for v in roi.start)
        stop = tuple(int(a + n) for a, n in zip(roi.start, roi.shape))
    else:
        if not level.in_nm:
            raise ConfigError(f"params.yaml: {key}: the image's axes carry no units, so a region in nm cannot be "
                              "placed; give it in voxels (roi)")
        # Voxel i covers [translation + i * scale, ... + scale): bounds snap to the nearest voxel boundary.
        start = tuple(math.floor((a - t) / s + 0.5) for a, t, s in zip(roi.start, level.translation, level.scale))
        stop = tuple(math.floor((a + n - t) / s + 0.5) for a, n, t, s in
                     zip(roi.start, roi.shape, level.translation, level.scale))
    if not all(0 <= a < b <= n for a, b, n in zip(start, stop, shape)):
        raise ConfigError(f"params.yaml: {key}: the region {list(start)}..{list(stop)} (voxels of level "
                          f"{level.path}) is not inside the level's shape {list(shape)}; choose a region inside it")
    return Box(start, stop)  # type: ignore[arg-type]


@dataclass
class Selection:
    """What the metadata says a copy of the wanted image must hold, and how normalize reads it."""

    image: Multiscale
    level: Level
    array: ArrayInfo
    box: Box
    labels: dict[str, tuple[Multiscale, ArrayInfo]]
    objects: dict[str, bytes]  # container-relative key -> metadata object (as served)

    @property
    def arrays(self) -> dict[str, ArrayInfo]:
        return {"raw": self.array, **{f"labels/{n}": a for n, (_, a) in self.labels.items()}}

    def geometry(self) -> tuple[Triple | None, Triple | None]:
        if not self.level.in_nm:
            return None, None
        start = self.box.start
        offset = tuple(t + a * s for t, a, s in zip(self.level.translation, start, self.level.scale))
        return self.level.scale, offset  # type: ignore[return-value]


def metadata_keys(wanted: Wanted) -> list[str]:
    """Container-relative keys of the metadata a copy holds (groups' and the level's arrays')."""
    groups = [wanted.image, *wanted.labels.values()]
    keys = {".zgroup"}
    for g in groups:
        keys.update({f"{g}/.zattrs", f"{g}/.zgroup", f"{g}/{wanted.level}/.zarray", f"{g}/{wanted.level}/.zattrs"})
        parts = g.split("/")  # the groups on the way, so the local copy opens as a zarr hierarchy
        keys.update(f"{'/'.join(parts[:i])}/.zgroup" for i in range(1, len(parts)))
    return sorted(keys)


def select(wanted: Wanted, objects: dict[str, bytes | None], dataset: str, where: Callable[[str], str],
           missing: Missing) -> Selection:
    """Check the metadata (``objects``: key -> bytes, None if absent), choose the level, place the ROI."""

    def document(key: str, what: str) -> dict[str, Any]:
        data = objects.get(key)
        if data is None:
            raise missing(key, what)
        return parse_json(data, where(key), dataset)

    attrs_key = f"{wanted.image}/.zattrs"
    image = parse_multiscales(document(attrs_key, f"{wanted.image!r} is not an OME-Zarr group (no .zattrs)"),
                              wanted.image, where(attrs_key), dataset)
    if wanted.level not in image.levels:
        raise ConfigError(f"params.yaml: datasets.{dataset}.source.level: {wanted.level!r} is not a level of "
                          f"{wanted.url(wanted.image)} (levels: {', '.join(image.levels)})")
    level = image.levels[wanted.level]
    arr_key = f"{wanted.image}/{wanted.level}"
    array = parse_zarray(document(f"{arr_key}/.zarray", f"the multiscales lists level {wanted.level!r}, but "
                                  "its .zarray is missing"), arr_key, image.lead, where(f"{arr_key}/.zarray"), dataset)
    box = voxel_box(wanted, level, array.space_shape, dataset)
    labels = {}
    for name, group in wanted.labels.items():
        key = f"{group}/.zattrs"
        ms = parse_multiscales(document(key, f"label {name!r}: {group!r} is not an OME-Zarr group (no .zattrs)"),
                               group, where(key), dataset)
        lab_level = ms.levels.get(wanted.level)
        zkey = f"{group}/{wanted.level}/.zarray"
        if lab_level is None or objects.get(zkey) is None:
            raise FormatError(dataset, where(key), f"label {name!r} has no level {wanted.level!r} "
                              f"(levels: {', '.join(ms.levels)})", "choose a level both the image and the labels have")
        lab = parse_zarray(document(zkey, ""), f"{group}/{wanted.level}", ms.lead, where(zkey), dataset)
        same = (lab_level.in_nm == level.in_nm and same_grid(lab_level.scale, level.scale, level.scale)
                and same_grid(lab_level.translation, level.translation, level.scale))
        if not same:
            raise FormatError(dataset, where(key), f"label {name!r} at level {wanted.level} lies on another grid "
                              f"(scale {list(lab_level.scale)}, translation {list(lab_level.translation)}) than the "
                              f"image (scale {list(level.scale)}, translation {list(level.translation)})",
                              "labels must share the image's voxel grid; choose other labels or another level")
        if not all(b <= n for b, n in zip(box.stop, lab.space_shape)):
            raise FormatError(dataset, where(zkey), f"label {name!r} has shape {list(lab.space_shape)} at level "
                              f"{wanted.level}, which does not hold the region {list(box.start)}..{list(box.stop)}",
                              "choose a region inside both the image and the labels")
        if np.dtype(lab.dtype).kind not in "biu":
            raise FormatError(dataset, where(zkey), f"label {name!r} has dtype {lab.dtype}",
                              "labels must be integers")
        labels[name] = (ms, lab)
    return Selection(image, level, array, box, labels, {k: v for k, v in objects.items() if v is not None})


def local_selection(wanted: Wanted, root: Path, dataset: str) -> Selection:
    """:func:`select` on a local copy (the container's folder); a missing object asks for a new fetch."""

    def where(key: str) -> str:
        return str(root / key)

    def missing(key: str, what: str) -> Exception:
        return FormatError(dataset, where(key), "is missing from the fetched copy",
                           f"fetch the dataset again (`emdata fetch {dataset}`)")

    objects: dict[str, bytes | None] = {}
    for key in metadata_keys(wanted):
        path = root / key
        objects[key] = path.read_bytes() if path.is_file() else None
    return select(wanted, objects, dataset, where, missing)
