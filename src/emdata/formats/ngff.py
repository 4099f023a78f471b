"""OME-Zarr metadata as a service writes it: NGFF 0.4 ``multiscales`` and zarr v2 ``.zarray``.

Pure functions on JSON, no I/O: what a level's voxels are (axes z, y, x after optional length-1
``t``/``c`` axes; units converted to nm; each dataset's ``scale`` and ``translation`` composed with
the multiscale's own, as NGFF 0.4 says), and what an array is (dtype, chunks, compressor, fill
value, order, ``dimension_separator`` ``.`` or ``/``, checked for what tensorstore reads) and
which chunk keys a box touches. Floats are compared with a tolerance relative to the voxel size:
the service writes ``11.840000000000002`` where 2.96 x 4 is meant. Used by ``sources.ome_zarr_s3``
for fetching (which chunks) and normalizing (which geometry), so it is one of its ``READERS``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from emdata.core import geometry
from emdata.core.boxes import Box, Grid
from emdata.errors import FormatError
import numpy as np

UNITS_NM = {"angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "centimeter": 1e7,
            "meter": 1e9, "picometer": 1e-3}
GRID_TOLERANCE = 1e-6  # relative to the voxel size: service floats such as 11.840000000000002 vs 11.84
SPACE = ("z", "y", "x")
COMPRESSORS = ("zstd", "blosc", "gzip", "zlib", "bz2")  # what tensorstore's zarr driver decodes
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Level:
    """One level of a multiscale: its array path and where its voxels lie (nm, ZYX; None without units)."""

    path: str
    scale: Triple  # in nm when the axes carry units, else as written
    translation: Triple
    in_nm: bool


@dataclass(frozen=True)
class Multiscale:
    group: str
    lead: int  # leading axes that are not spatial (t, c): their arrays must have length 1 there
    levels: dict[str, Level]
    version: str | None
    name: str | None


@dataclass(frozen=True)
class ArrayInfo:
    """A level's ``.zarray``, checked: what decides its chunk keys and what normalize will read."""

    key: str  # container-relative path of the array
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    separator: str
    lead: int
    zarray: dict[str, Any]

    @property
    def space_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[self.lead:])  # type: ignore[return-value]

    @property
    def chunk_grid(self) -> Grid:
        """The chunks of the Z, Y, X axes."""
        return Grid(self.space_shape, self.chunks[self.lead:])  # type: ignore[arg-type]

    def chunk_rows(self, box: Box) -> list[tuple[int, ...]]:
        """Indices of the chunks ``box`` touches along the leading axes and Z (one listing prefix each)."""
        rows = sorted({z for z, _, _ in self.chunk_grid.touched(box)})
        return [(0,) * self.lead + (z,) for z in rows]

    def chunk_keys(self, box: Box) -> list[str]:
        """The keys of the chunks ``box`` touches, C order."""
        lead = ["0"] * self.lead
        return [f"{self.key}/" + self.separator.join([*lead, *map(str, index)])
                for index in self.chunk_grid.touched(box)]

    def row_prefix(self, row: tuple[int, ...]) -> str:
        return f"{self.key}/" + self.separator.join(str(i) for i in row) + self.separator


def parse_json(data: bytes, where: str, dataset: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise FormatError(dataset, where, f"not valid JSON ({exc})", "the object is damaged or not zarr metadata") from exc
    if not isinstance(value, dict):
        raise FormatError(dataset, where, "not a JSON object", "the object is not zarr metadata")
    return value


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    ok = isinstance(value, list) and len(value) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return tuple(float(v) for v in value) if ok else None


def _transforms(items: Any, n: int, where: str, dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, translation) of an NGFF 0.4 ``coordinateTransformations`` list (a scale, then an optional translation)."""
    scale, translation = (1.0,) * n, (0.0,) * n
    if items is None:
        return scale, translation
    kinds = [t.get("type") if isinstance(t, dict) else None for t in items] if isinstance(items, list) else [None]
    if kinds not in (["scale"], ["scale", "translation"], []):
        raise FormatError(dataset, where, f"coordinateTransformations {kinds} are not a scale and an optional "
                          "translation (NGFF 0.4)", "only inline scale/translation transformations are supported")
    for t in items:
        values = _floats(t.get(t["type"]), n)
        if values is None:
            raise FormatError(dataset, where, f"the {t['type']} {t.get(t['type'])!r} is not {n} finite numbers",
                              "the multiscales metadata is damaged")
        if t["type"] == "scale":
            scale = values
        else:
            translation = values
    return scale, translation


def parse_multiscales(attrs: dict[str, Any], group: str, where: str, dataset: str) -> Multiscale:
    """The first multiscale of a group's ``.zattrs``, its geometry converted to nm (ZYX)."""
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise FormatError(dataset, where, "the group's .zattrs has no 'multiscales' (not an OME-Zarr image)",
                          "check the container and group paths in params.yaml")
    ms = multiscales[0]
    axes = ms.get("axes")
    if not isinstance(axes, list) or not all(isinstance(a, dict) and isinstance(a.get("name"), str) for a in axes):
        raise FormatError(dataset, where, f"multiscales axes {axes!r} are not NGFF 0.4 axes objects",
                          "only NGFF 0.4 (axes with names, types and units) is supported")
    names = [a["name"].lower() for a in axes]
    lead = len(axes) - 3
    spatial = axes[lead:] if lead >= 0 else []
    if lead < 0 or tuple(names[lead:]) != SPACE or any(a.get("type", "space") != "space" for a in spatial) or any(
            a.get("type") == "space" for a in axes[:lead]):
        raise FormatError(dataset, where, f"axes {names} are not (optionally t, c and then) z, y, x",
                          "only 3D images with spatial axes in z, y, x order are supported")
    units = [a.get("unit") for a in spatial]
    factors: tuple[float, ...] = (1.0, 1.0, 1.0)
    if all(u is None for u in units):
        in_nm = False
    else:
        unknown = [u for u in units if not isinstance(u, str) or u.lower() not in UNITS_NM]
        if unknown:
            raise FormatError(dataset, where, f"axis unit {unknown[0]!r} is not a length unit NGFF names",
                              f"known units: {', '.join(UNITS_NM)}")
        factors, in_nm = tuple(UNITS_NM[str(u).lower()] for u in units), True
    n = len(axes)
    g_scale, g_trans = _transforms(ms.get("coordinateTransformations"), n, where, dataset)
    levels: dict[str, Level] = {}
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise FormatError(dataset, where, "multiscales has no datasets", "the group lists no arrays")
    for entry in datasets:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not path:
            raise FormatError(dataset, where, f"a multiscales dataset has no path ({entry!r})", "the metadata is damaged")
        scale, trans = _transforms(entry.get("coordinateTransformations"), n, where, dataset)
        # NGFF 0.4: the multiscale's own transformations apply after each dataset's.
        eff_scale = [s * g for s, g in zip(scale, g_scale)][lead:]
        eff_trans = [t * g + h for t, g, h in zip(trans, g_scale, g_trans)][lead:]
        levels[path] = Level(path, tuple(s * f for s, f in zip(eff_scale, factors)),  # type: ignore[arg-type]
                             tuple(t * f for t, f in zip(eff_trans, factors)), in_nm)  # type: ignore[arg-type]
    version = ms.get("version")
    return Multiscale(group, lead, levels, version if isinstance(version, str) else None,
                      ms.get("name") if isinstance(ms.get("name"), str) else None)


def parse_zarray(meta: dict[str, Any], key: str, lead: int, where: str, dataset: str) -> ArrayInfo:
    """A level's ``.zarray`` (zarr v2), checked for what tensorstore reads and chunk keys need."""

    def bad(problem: str) -> FormatError:
        return FormatError(dataset, where, problem, "the array cannot be read as zarr v2")

    if meta.get("zarr_format") != 2:
        raise bad(f"zarr_format {meta.get('zarr_format')!r} is not 2")
    shape: Any = meta.get("shape")
    chunks: Any = meta.get("chunks")
    ints = (lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))
    if not ints(shape) or not ints(chunks) or len(shape) != len(chunks) or len(shape) != lead + 3 or 0 in chunks:
        raise bad(f"shape {shape!r} and chunks {chunks!r} are not {lead + 3} matching dimensions")
    if any(n != 1 for n in shape[:lead]):
        raise bad(f"shape {shape}: the non-spatial axes must have length 1")
    try:
        dtype = np.dtype(meta.get("dtype"))
    except TypeError as exc:
        raise bad(f"dtype {meta.get('dtype')!r} is not a numpy dtype") from exc
    if dtype.kind not in "biuf":
        raise bad(f"dtype {meta.get('dtype')!r} is not a number type")
    separator = meta.get("dimension_separator") or "."
    if separator not in (".", "/"):
        raise bad(f"dimension_separator {separator!r} is neither '.' nor '/'")
    if meta.get("order", "C") not in ("C", "F"):
        raise bad(f"order {meta.get('order')!r} is neither C nor F")
    if meta.get("filters"):
        raise bad(f"filters {meta.get('filters')!r} are not supported")
    compressor = meta.get("compressor")
    if compressor is not None and (not isinstance(compressor, dict) or compressor.get("id") not in COMPRESSORS):
        raise bad(f"compressor {compressor!r} is not one tensorstore reads (zstd, blosc, gzip, zlib, bz2)")
    return ArrayInfo(key, tuple(shape), tuple(chunks), str(meta.get("dtype")), separator, lead, meta)


def same_grid(a: Triple, b: Triple, scale: Triple) -> bool:
    """Equal within GRID_TOLERANCE of the voxel size (the service's float noise is no difference):
    geometry's one rule (values compared in voxels), with a tolerance for float noise only."""
    return geometry.same_grid(a, b, scale, GRID_TOLERANCE)
