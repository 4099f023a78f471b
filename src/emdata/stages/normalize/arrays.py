"""A volume dataset's arrays as normalize reads them: the source's image and labels, on one grid.

Opened by the single-process writer and, on a cluster, by each worker
(:mod:`emdata.stages.normalize.distributed`), so both read the same voxels.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from emdata.core.geometry import same_geometry
from emdata.errors import ConfigError, FormatError
from emdata.formats.raw import MappedVolume, RawVolume
from emdata.sources.dataset import Dataset


def check_labels(key: str, volume: RawVolume, labels: dict[str, RawVolume], params_voxel: Any = None) -> None:
    """Every label has the image's shape, voxel size and offset (offsets compared in voxels)."""
    for name, lab in labels.items():
        if tuple(lab.shape) != tuple(volume.shape):
            where = getattr(lab, "path", f"labels/{name}")
            raise FormatError(key, str(where), f"label {name!r} has shape {tuple(lab.shape)} but the image has "
                              f"{tuple(volume.shape)}", "check that both files are complete and belong together")
        # Offsets are compared in voxels; with no voxel size anywhere, geometry.resolve refuses anyway.
        voxel = volume.voxel_size_nm or lab.voxel_size_nm or params_voxel
        for attr, scale in (("voxel_size_nm", None), ("offset_nm", voxel)):
            mine, theirs = getattr(lab, attr), getattr(volume, attr)
            if attr == "offset_nm" and scale is None:
                continue
            if mine is not None and theirs is not None and not same_geometry(mine, theirs, scale):
                raise FormatError(key, f"labels/{name}", f"{attr} {mine} differs from the image's {theirs}",
                                  "labels must lie on the image's grid")


def map_label_values(key: str, labels: dict[str, RawVolume],
                     values: dict[str, dict[int, int]]) -> dict[str, RawVolume]:
    """Labels with the value mappings of params (``label_values``) applied as they are read."""
    unknown = sorted(set(values) - set(labels))
    if unknown:
        raise ConfigError(f"params.yaml: datasets.{key}.label_values.{unknown[0]}: no such label "
                          f"(labels: {', '.join(sorted(labels)) or 'none'})")
    return {name: MappedVolume(lab, values[name]) if name in values else lab for name, lab in labels.items()}


def open_arrays(stack: ExitStack, ds: Dataset) -> tuple[RawVolume, dict[str, RawVolume]]:
    """The source's image and labels (label value maps applied), checked to lie on one grid."""
    key, raw = ds.key, ds.paths.raw
    volume = stack.enter_context(ds.module.open_volume(ds.source, raw, key))
    open_labels = getattr(ds.module, "open_labels", None)
    labels = {n: stack.enter_context(v) for n, v in (open_labels(ds.source, raw, key) if open_labels else {}).items()}
    check_labels(key, volume, labels, ds.voxel_size_nm)
    return volume, map_label_values(key, labels, ds.label_values)
