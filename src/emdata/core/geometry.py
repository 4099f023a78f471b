"""Voxel size and offset: one choice among named candidates, one params key to settle a disagreement.

Rules (docs/architecture.md, "Geometry"):

- params.yaml's ``voxel_size_nm``/``offset_nm`` are optional overrides of what the source reports;
- a value that neither side gives is a ConfigError (a voxel size is never guessed);
- candidates that are apart are a FormatError naming each value, unless the dataset's
  ``geometry_trust`` names the one that wins.

:func:`pick` is that choice for any candidates: ``params`` against ``source`` in normalize
(:func:`resolve`), and inside a source that reads one value twice (EMPIAR's DM3 calibration and
API, ``dm3``/``api``; IDR's OMERO sizes and ImageJ tags, ``omero``/``imagej``). One key,
``geometry_trust``, takes any of those names: a source's own candidate also wins over params.

"Apart" is one rule, :func:`same_grid`, in units of the voxel size: two voxel sizes more than 1 %
of the larger one, two offsets more than 1 % of a voxel. An offset's own magnitude never widens
the tolerance (100000 nm and 100800 nm are 100 voxels of 8 nm apart, not 0.8 %). OME-Zarr's
label/image grids (:func:`emdata.formats.ngff.same_grid`) use the same rule with a tolerance for float
noise only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

from emdata.errors import ConfigError, FormatError

TOLERANCE = 0.01  # of a voxel
PARAMS, SOURCE = "params", "source"  # the candidates every dataset has
SAID = {PARAMS: "params.yaml", SOURCE: "the source"}  # how an error names them
Triple = tuple[float, float, float]
Values = tuple[float, ...]  # one value per axis (a collection's 2D images have two)


@dataclass(frozen=True)
class Geometry:
    voxel_size_nm: Triple
    offset_nm: Triple
    origin: dict[str, str]  # "voxel_size_nm"/"offset_nm" -> "params", "source" or "params (source agrees)"

    def to_dict(self) -> dict[str, Any]:
        return {"voxel_size_nm": list(self.voxel_size_nm), "offset_nm": list(self.offset_nm),
                "origin": dict(self.origin)}


class Choice(NamedTuple):
    value: Any  # the winner's values, None when no candidate has any
    origin: str  # provenance: "source", "params (source agrees)", "omero (ImageJ tags differ, geometry_trust: omero)"
    name: str | None  # the winning candidate


def same_grid(a: tuple[float, ...], b: tuple[float, ...], voxel: tuple[float, ...],
              tolerance: float = TOLERANCE) -> bool:
    """On every axis at most ``tolerance`` voxels apart (a voxel size of 0 allows no difference)."""
    return all(abs(x - y) <= tolerance * abs(v) for x, y, v in zip(a, b, voxel))


def same_geometry(a: Values, b: Values, voxel: Values | None = None) -> bool:
    """Offsets (``voxel`` given): within 1 % of that voxel size. Voxel sizes (no ``voxel``): within
    1 % of the larger of the two, i.e. each size measured in its own voxels."""
    scale = voxel if voxel is not None else tuple(max(abs(x), abs(y)) for x, y in zip(a, b))
    return same_grid(a, b, scale)


def _fmt(values: Values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _verb(labels: list[str], verb: str) -> str:
    """``source agrees``, ``params differ``, ``ImageJ tags agree``: a label ending in s reads as plural."""
    plural = len(labels) > 1 or labels[0].endswith("s")
    return f"{' and '.join(labels)} {verb if plural else verb + 's'}"


def pick(what: str, candidates: Mapping[str, Values | None], trust: str | None, *, key: str,
         scale: Values | None = None, labels: Mapping[str, str] | None = None,
         trusted_by: Mapping[str, tuple[str, ...]] | None = None, where: str | None = None) -> Choice:
    """The value of ``what`` among ``candidates`` (name -> values or None, in order of preference).

    One candidate with values wins alone; all within :func:`same_geometry` of the first (``scale``:
    the voxel size offsets are measured in, None for voxel sizes) give the first; apart, the
    candidate ``trust`` names wins (or the one ``trusted_by`` lists it for), else a FormatError at
    ``where`` (default: the params key) names every value and the names ``geometry_trust`` takes.
    ``labels`` name candidates in the provenance (``ImageJ tags``; default: the name).
    """
    present = {name: values for name, values in candidates.items() if values is not None}
    if not present:
        return Choice(None, "none", None)
    label = {name: (labels or {}).get(name, name) for name in present}
    first = next(iter(present))
    others = [label[name] for name in present if name != first]
    if not others:
        return Choice(present[first], first, first)
    if all(same_geometry(present[first], values, scale) for values in present.values()):
        return Choice(present[first], f"{first} ({_verb(others, 'agree')})", first)
    for name, values in present.items():
        if trust is not None and trust in (name, *(trusted_by or {}).get(name, ())):
            differ = _verb([label[n] for n in present if n != name], "differ")
            return Choice(values, f"{name} ({differ}, geometry_trust: {trust})", name)
    said = " but ".join(_verb([SAID.get(name, label[name])], "say") + f" {_fmt(values)} nm"
                        for name, values in present.items())
    fix = "correct one of them, or " if PARAMS in present else ""
    raise FormatError(key, where or f"datasets.{key}.{what}", said,
                      f"{fix}set datasets.{key}.geometry_trust to {' or '.join(present)}")


def override(what: str, key: str, params: Values | None, source: Values | None, trust: str | None, *,
             scale: Values | None = None, source_names: tuple[str, ...] = ()) -> Choice:
    """params.yaml's value against the source's by :func:`pick`; neither is a ConfigError.
    ``source_names``: the source's own candidates, whose trust also makes the source win."""
    if params is None and source is None:
        raise ConfigError(f"params.yaml: datasets.{key}.{what}: the source does not report it; "
                          f"set it in params.yaml as [z, y, x] in nm")
    return pick(what, {PARAMS: params, SOURCE: source}, trust, key=key, scale=scale,
                trusted_by={SOURCE: source_names})


def resolve(key: str, *, params_voxel: Triple | None, params_offset: Triple | None,
            source_voxel: Triple | None, source_offset: Triple | None, trust: str | None,
            source_names: tuple[str, ...] = ()) -> Geometry:
    """The geometry a dataset's HDF5 records, by the rules in the module docstring."""
    voxel = override("voxel_size_nm", key, params_voxel, source_voxel, trust, source_names=source_names)
    offset = override("offset_nm", key, params_offset, source_offset, trust, scale=voxel.value,
                      source_names=source_names)
    return Geometry(tuple(float(v) for v in voxel.value), tuple(float(v) for v in offset.value),  # type: ignore[arg-type]
                    {"voxel_size_nm": voxel.origin, "offset_nm": offset.origin})
