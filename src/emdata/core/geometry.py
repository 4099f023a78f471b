"""Voxel size and offset: from the data where the format carries them, params.yaml overriding.

Rules (docs/architecture.md, "Geometry"):

- params.yaml's ``voxel_size_nm``/``offset_nm`` are optional overrides of what the source reports;
- a value that neither side gives is a ConfigError (a voxel size is never guessed);
- both present and apart is a FormatError naming both values, unless the dataset's
  ``geometry_trust`` says which side wins (``params`` or ``source``).

"Apart" is one rule, :func:`same_grid`, in units of the voxel size: two voxel sizes more than 1 %
of the larger one, two offsets more than 1 % of a voxel. An offset's own magnitude never widens
the tolerance (100000 nm and 100800 nm are 100 voxels of 8 nm apart, not 0.8 %). OME-Zarr's
label/image grids (:func:`emdata.formats.ngff.same_grid`) use the same rule with a tolerance for float
noise only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emdata.errors import ConfigError, FormatError

TOLERANCE = 0.01  # of a voxel
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Geometry:
    voxel_size_nm: Triple
    offset_nm: Triple
    origin: dict[str, str]  # "voxel_size_nm"/"offset_nm" -> "params", "source" or "params (source agrees)"

    def to_dict(self) -> dict[str, Any]:
        return {"voxel_size_nm": list(self.voxel_size_nm), "offset_nm": list(self.offset_nm),
                "origin": dict(self.origin)}


def same_grid(a: tuple[float, ...], b: tuple[float, ...], voxel: tuple[float, ...],
              tolerance: float = TOLERANCE) -> bool:
    """On every axis at most ``tolerance`` voxels apart (a voxel size of 0 allows no difference)."""
    return all(abs(x - y) <= tolerance * abs(v) for x, y, v in zip(a, b, voxel))


def same_geometry(a: Triple, b: Triple, voxel: Triple | None = None) -> bool:
    """Offsets (``voxel`` given): within 1 % of that voxel size. Voxel sizes (no ``voxel``): within
    1 % of the larger of the two, i.e. each size measured in its own voxels."""
    scale = voxel if voxel is not None else tuple(max(abs(x), abs(y)) for x, y in zip(a, b))
    return same_grid(a, b, scale)


def _fmt(values: Triple) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def pick(name: str, key: str, params: Triple | None, source: Triple | None, trust: str | None,
         scale: Triple | None) -> tuple[Triple, str]:
    """One value of ``name`` (``voxel_size_nm`` or ``offset_nm``) and where it came from, by the rules
    above: one side alone wins; both within :func:`same_geometry` (``scale``: the voxel size
    offsets are measured in, None for voxel sizes) give params; apart, ``trust`` decides or it is
    a FormatError. Works per axis for any number of axes (a collection's 2D images too)."""
    if params is None and source is None:
        raise ConfigError(f"params.yaml: datasets.{key}.{name}: the source does not report it; "
                          f"set it in params.yaml as [z, y, x] in nm")
    if source is None:
        return params, "params"  # type: ignore[return-value]
    if params is None:
        return source, "source"
    if same_geometry(params, source, scale):
        return params, "params (source agrees)"
    if trust == "params":
        return params, "params (source differs, geometry_trust: params)"
    if trust == "source":
        return source, "source (params differ, geometry_trust: source)"
    raise FormatError(key, f"datasets.{key}.{name}",
                      f"params.yaml says {_fmt(params)} nm but the source says {_fmt(source)} nm",
                      f"correct one of them, or set datasets.{key}.geometry_trust to params or source")


def resolve(key: str, *, params_voxel: Triple | None, params_offset: Triple | None,
            source_voxel: Triple | None, source_offset: Triple | None, trust: str | None) -> Geometry:
    """The geometry a dataset's HDF5 records, by the rules in the module docstring."""
    voxel, voxel_from = pick("voxel_size_nm", key, params_voxel, source_voxel, trust, None)
    offset, offset_from = pick("offset_nm", key, params_offset, source_offset, trust, voxel)
    return Geometry(tuple(float(v) for v in voxel), tuple(float(v) for v in offset),  # type: ignore[arg-type]
                    {"voxel_size_nm": voxel_from, "offset_nm": offset_from})
