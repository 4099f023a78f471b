"""Voxel size and offset: from the data where the format carries them, params.yaml overriding.

Rules (docs/architecture.md, "Geometry"):

- params.yaml's ``voxel_size_nm``/``offset_nm`` are optional overrides of what the source reports;
- a value that neither side gives is a ConfigError (a voxel size is never guessed);
- both present and more than 1 % apart is a FormatError naming both values, unless the
  dataset's ``geometry_trust`` says which side wins (``params`` or ``source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, FormatError

TOLERANCE = 0.01
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Geometry:
    voxel_size_nm: Triple
    offset_nm: Triple
    origin: dict[str, str]  # "voxel_size_nm"/"offset_nm" -> "params", "source" or "params (source agrees)"

    def to_dict(self) -> dict[str, Any]:
        return {"voxel_size_nm": list(self.voxel_size_nm), "offset_nm": list(self.offset_nm),
                "origin": dict(self.origin)}


def _differs(a: Triple, b: Triple, scale: Triple) -> bool:
    """More than 1 % apart on some axis, relative to the larger magnitude (or the voxel size near 0)."""
    for x, y, s in zip(a, b, scale):
        size = max(abs(x), abs(y), abs(s))
        if abs(x - y) > TOLERANCE * size:
            return True
    return False


def same_geometry(a: Triple, b: Triple, scale: Triple | None = None) -> bool:
    """Within 1 % (relative to the larger value, or to ``scale``, the voxel size, near zero)."""
    return not _differs(a, b, scale or a)


def _fmt(values: Triple) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _pick(name: str, key: str, params: Triple | None, source: Triple | None, trust: str | None,
          scale: Triple | None) -> tuple[Triple, str]:
    if params is None and source is None:
        raise ConfigError(f"params.yaml: datasets.{key}.{name}: the source does not report it; "
                          f"set it in params.yaml as [z, y, x] in nm")
    if source is None:
        return params, "params"  # type: ignore[return-value]
    if params is None:
        return source, "source"
    if not _differs(params, source, scale or params):
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
    voxel, voxel_from = _pick("voxel_size_nm", key, params_voxel, source_voxel, trust, None)
    offset, offset_from = _pick("offset_nm", key, params_offset, source_offset, trust, voxel)
    return Geometry(tuple(float(v) for v in voxel), tuple(float(v) for v in offset),  # type: ignore[arg-type]
                    {"voxel_size_nm": voxel_from, "offset_nm": offset_from})
