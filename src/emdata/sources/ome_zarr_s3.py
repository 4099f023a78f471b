"""OME-Zarr multiscale images (zarr v2, NGFF 0.4) in public S3 buckets, read anonymously.

Made for OpenOrganelle/CellMap (bucket ``janelia-cosem-datasets``, e.g. jrc_mus-nacc-2: FIB-SEM
of mouse nucleus accumbens, int16, 9 levels of 64^3 Zstd chunks, nucleus labels), and generic
over any such container: endpoint, region, bucket, container, image group, level, region of
interest and label groups come from params.yaml; shapes, dtypes, chunking and geometry come from
the service's own metadata (the group's ``multiscales``: axes, units, per-level ``scale`` and
``translation``; each level's ``.zarray``), never from here. Labels must lie on the image's grid
at the chosen level (same scale and translation, compared with a float tolerance).

``fetch`` copies exactly the chunk objects the region touches, byte for byte, plus the group and
array metadata, into ``data/raw/<ds>/<container name>/`` (a valid local zarr subset) and records
each object's size and sha256; chunks the service does not have are the fill value, as zarr
specifies, and are not fetched. Requests are unsigned (no credentials are looked up, sent or
needed; no instance-metadata probe). Objects are read through tensorstore's ``s3`` key-value
store (bounded retries with backoff for SlowDown/5xx and dropped connections, concurrent, C++
fast); listings, which tensorstore gives without sizes, through s3fs/botocore. Each object is
checked against the listing (size, and the MD5 an S3 ETag is for a single-part upload) and
written under a temporary name, so an interrupted fetch resumes without fetching finished chunks
again. ``plan`` reads only metadata and listings and reports chunk counts and compressed bytes.

Cite (OpenOrganelle): Heinrich et al., Nature 2021, doi:10.1038/s41586-021-03977-3; Xu et al.,
Nature 2021, doi:10.1038/s41586-021-03992-4. Licence CC-BY-4.0.

params.yaml::

    source:
      kind: ome_zarr_s3
      endpoint: https://s3.us-east-1.amazonaws.com   # optional (default: AWS for the region)
      region: us-east-1
      bucket: janelia-cosem-datasets
      container: jrc_mus-nacc-2/jrc_mus-nacc-2.zarr
      image: recon-2/em/fibsem-int16
      level: s0                                        # a dataset path of the multiscale
      roi: {start: [192, 1024, 1024], shape: [256, 512, 512]}   # voxels of that level (z, y, x)
      # roi_nm: {start: [...], shape: [...]}           # or nm, in the image's physical frame
      labels: {nucleus: recon-2/labels/inference/segmentations/nuc}
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..config import KEY_PATTERN, Section, as_str, as_triple, as_url
from ..errors import ConfigError, FetchError, FormatError, IntegrityError
from ..fetch_context import FetchContext
from ..fetch_record import FetchedFile, FetchRecord, safe_relpath
from .base import FilePlan

if TYPE_CHECKING:
    from ..io.zarr import ZarrVolume
    from ..raw import RawVolume

KIND = "ome_zarr_s3"
READERS = ("emdata.io.zarr",)
UNITS_NM = {"angstrom": 0.1, "nanometer": 1.0, "micrometer": 1e3, "millimeter": 1e6, "centimeter": 1e7,
            "meter": 1e9, "picometer": 1e-3}
GRID_TOLERANCE = 1e-6  # relative to the voxel size: service floats such as 11.840000000000002 vs 11.84
SPACE = ("z", "y", "x")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")
_REGION = re.compile(r"^[a-z0-9-]+$")
Triple = tuple[float, float, float]
Box = tuple[tuple[int, int, int], tuple[int, int, int]]


# -- params ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roi:
    """A box of the chosen level: ``unit`` ``voxel`` (its voxels) or ``nm`` (the image's physical frame)."""

    start: Triple
    shape: Triple
    unit: str

    def to_dict(self) -> dict[str, Any]:
        num = int if self.unit == "voxel" else float
        return {"start": [num(v) for v in self.start], "shape": [num(v) for v in self.shape], "unit": self.unit}


@dataclass(frozen=True)
class Params:
    bucket: str
    container: str  # key prefix of the zarr container inside the bucket
    image: str  # the image group inside the container
    level: str
    region: str
    endpoint: str | None = None  # None: AWS for the region
    roi: Roi | None = None  # None: the whole level
    labels: dict[str, str] = field(default_factory=dict)  # name -> label group inside the container

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "endpoint": self.endpoint, "region": self.region, "bucket": self.bucket,
                "container": self.container, "image": self.image, "level": self.level,
                "roi": self.roi.to_dict() if self.roi else None, "labels": dict(self.labels)}

    @property
    def local_root(self) -> str:
        """The container's folder in the raw folder (its last path component)."""
        return self.container.rsplit("/", 1)[-1]

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.container}/{key}"


def _key_path(value: Any, path: str) -> str:
    text = as_str(value, path)
    return safe_relpath(text, f"params.yaml: {path} (a key path inside the bucket, no leading '/')")


def _bucket(value: Any, path: str) -> str:
    text = as_str(value, path)
    if not _BUCKET.fullmatch(text) or ".." in text:
        raise ConfigError(f"params.yaml: {path}: {text!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    return text


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[Any, str], str]:
    def parse(value: Any, path: str) -> str:
        text = as_str(value, path)
        if not pattern.fullmatch(text):
            raise ConfigError(f"params.yaml: {path}: {text!r} is not {what}")
        return text

    return parse


def _roi(sec: Section, key: str, unit: str) -> Roi | None:
    if sec.data.get(key) is None:
        sec.optional(key, lambda v, p: v)
        return None
    roi = sec.section(key)
    if unit == "voxel":
        def ints(positive: bool) -> Callable[[Any, str], Triple]:
            def parse(value: Any, path: str) -> Triple:
                ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
                    isinstance(v, int) and not isinstance(v, bool) and (v > 0 if positive else v >= 0) for v in value)
                if not ok:
                    kind = "positive" if positive else "non-negative"
                    raise ConfigError(f"params.yaml: {path}: expected three {kind} integers [z, y, x] (voxels), "
                                      f"got {value!r}")
                return tuple(float(v) for v in value)  # type: ignore[return-value]
            return parse
        out = Roi(roi.required("start", ints(False)), roi.required("shape", ints(True)), unit)
    else:
        out = Roi(roi.required("start", as_triple(positive=False)), roi.required("shape", as_triple(positive=True)), unit)
    roi.finish()
    return out


def parse_params(sec: Section) -> Params:
    endpoint = sec.optional("endpoint", as_url)
    region = sec.required("region", _matching(_REGION, "an AWS region name such as us-east-1"))
    bucket = sec.required("bucket", _bucket)
    container = sec.required("container", _key_path)
    image = sec.required("image", _key_path)
    level = sec.required("level", _matching(_LEVEL, "a level path of the multiscale such as s0"))
    roi, roi_nm = _roi(sec, "roi", "voxel"), _roi(sec, "roi_nm", "nm")
    if roi and roi_nm:
        raise ConfigError(f"params.yaml: {sec.path}.roi_nm: give the region either in voxels (roi) or in nm "
                          "(roi_nm), not both")
    labels_sec = sec.section("labels", required=False)
    labels = {}
    for name in labels_sec.keys():
        if not isinstance(name, str) or not KEY_PATTERN.fullmatch(name):
            raise ConfigError(f"params.yaml: {labels_sec.path}.{name}: label names must match {KEY_PATTERN.pattern}")
        labels[name] = _key_path(labels_sec.data[name], f"{labels_sec.path}.{name}")
    return Params(bucket=bucket, container=container, image=image, level=level, region=region,
                  endpoint=endpoint, roi=roi or roi_nm, labels=labels)


# -- the service's metadata -----------------------------------------------------------------------


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

    def chunk_rows(self, box: Box) -> list[tuple[int, ...]]:
        """Indices of the chunks ``box`` touches along the leading axes and Z (one listing prefix each)."""
        (z0, _, _), (z1, _, _) = box
        cz = self.chunks[self.lead]
        return [(0,) * self.lead + (k,) for k in range(z0 // cz, (z1 - 1) // cz + 1)]

    def chunk_keys(self, box: Box) -> list[str]:
        start, stop = box
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, self.chunks[self.lead:])]
        lead = ["0"] * self.lead
        return [f"{self.key}/" + self.separator.join([*lead, str(i), str(j), str(k)])
                for i in ranges[0] for j in ranges[1] for k in ranges[2]]

    def row_prefix(self, row: tuple[int, ...]) -> str:
        return f"{self.key}/" + self.separator.join(str(i) for i in row) + self.separator


def _json(data: bytes, where: str, dataset: str) -> dict[str, Any]:
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
    import numpy as np

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
    if compressor is not None and (not isinstance(compressor, dict) or compressor.get("id") not in
                                   ("zstd", "blosc", "gzip", "zlib", "bz2")):
        raise bad(f"compressor {compressor!r} is not one tensorstore reads (zstd, blosc, gzip, zlib, bz2)")
    return ArrayInfo(key, tuple(shape), tuple(chunks), str(meta.get("dtype")), separator, lead, meta)


def _close(a: Triple, b: Triple, scale: Triple) -> bool:
    return all(abs(x - y) <= GRID_TOLERANCE * max(abs(s), 1e-300) for x, y, s in zip(a, b, scale))


def voxel_box(params: Params, level: Level, shape: tuple[int, int, int], dataset: str) -> Box:
    """The ROI in voxels of the level, or a ConfigError naming the key when it is not inside it."""
    roi = params.roi
    key = f"datasets.{dataset}.source.{'roi_nm' if roi and roi.unit == 'nm' else 'roi'}"
    if roi is None:
        return (0, 0, 0), shape
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
    return start, stop  # type: ignore[return-value]


@dataclass
class Selection:
    """What the metadata says a fetch of these params must copy, and how normalize reads it."""

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
        start = self.box[0]
        offset = tuple(t + a * s for t, a, s in zip(self.level.translation, start, self.level.scale))
        return self.level.scale, offset  # type: ignore[return-value]


def _metadata_keys(params: Params) -> tuple[list[str], list[str]]:
    """(required, optional) container-relative metadata keys a fetch copies."""
    groups = [params.image, *params.labels.values()]
    required = [f"{g}/.zattrs" for g in groups] + [f"{g}/{params.level}/.zarray" for g in groups]
    optional = [".zgroup", *(f"{g}/.zgroup" for g in groups), *(f"{g}/{params.level}/.zattrs" for g in groups)]
    for g in groups:  # the groups on the way, so the local copy opens as a zarr hierarchy
        parts = g.split("/")
        optional += [f"{'/'.join(parts[:i])}/.zgroup" for i in range(1, len(parts))]
    return required, sorted(set(optional) - set(required))


def select(params: Params, read: Callable[[list[str], list[str]], dict[str, bytes | None]],
           dataset: str, where: Callable[[str], str]) -> Selection:
    """Read and check the metadata (``read(required, optional)``), choose the level, place the ROI."""
    import numpy as np

    required, optional = _metadata_keys(params)
    objects = read(required, optional)
    attrs_key = f"{params.image}/.zattrs"
    image = parse_multiscales(_json(objects[attrs_key] or b"", where(attrs_key), dataset), params.image,
                              where(attrs_key), dataset)
    if params.level not in image.levels:
        raise ConfigError(f"params.yaml: datasets.{dataset}.source.level: {params.level!r} is not a level of "
                          f"{params.url(params.image)} (levels: {', '.join(image.levels)})")
    level = image.levels[params.level]
    arr_key = f"{params.image}/{params.level}"
    if objects.get(f"{arr_key}/.zarray") is None:
        raise FetchError(dataset, where(f"{arr_key}/.zarray"), "no such object, although the multiscales "
                         "metadata lists the level", "the container is incomplete on the server")
    array = parse_zarray(_json(objects[f"{arr_key}/.zarray"] or b"", where(f"{arr_key}/.zarray"), dataset),
                         arr_key, image.lead, where(f"{arr_key}/.zarray"), dataset)
    box = voxel_box(params, level, array.space_shape, dataset)
    labels = {}
    for name, group in params.labels.items():
        key = f"{group}/.zattrs"
        ms = parse_multiscales(_json(objects[key] or b"", where(key), dataset), group, where(key), dataset)
        lab_level = ms.levels.get(params.level)
        zkey = f"{group}/{params.level}/.zarray"
        if lab_level is None or objects.get(zkey) is None:
            raise FormatError(dataset, where(key), f"label {name!r} has no level {params.level!r} "
                              f"(levels: {', '.join(ms.levels)})", "choose a level both the image and the labels have")
        lab = parse_zarray(_json(objects[zkey] or b"", where(zkey), dataset), f"{group}/{params.level}", ms.lead,
                           where(zkey), dataset)
        same = (lab_level.in_nm == level.in_nm and _close(lab_level.scale, level.scale, level.scale)
                and _close(lab_level.translation, level.translation, level.scale))
        if not same:
            raise FormatError(dataset, where(key), f"label {name!r} at level {params.level} lies on another grid "
                              f"(scale {list(lab_level.scale)}, translation {list(lab_level.translation)}) than the "
                              f"image (scale {list(level.scale)}, translation {list(level.translation)})",
                              "labels must share the image's voxel grid; choose other labels or another level")
        if not all(b <= n for b, n in zip(box[1], lab.space_shape)):
            raise FormatError(dataset, where(zkey), f"label {name!r} has shape {list(lab.space_shape)} at level "
                              f"{params.level}, which does not hold the region {list(box[0])}..{list(box[1])}",
                              "choose a region inside both the image and the labels")
        if np.dtype(lab.dtype).kind not in "biu":
            raise FormatError(dataset, where(zkey), f"label {name!r} has dtype {lab.dtype}",
                              "labels must be integers")
        labels[name] = (ms, lab)
    missing = [k for k in required if objects.get(k) is None]
    if missing:  # pragma: no cover - every required key was checked above
        raise FetchError(dataset, where(missing[0]), "no such object", "check the paths in params.yaml")
    return Selection(image, level, array, box, labels, {k: v for k, v in objects.items() if v is not None})


# -- the service --------------------------------------------------------------------------------


class _Bucket:
    """Unsigned reads of one container: objects through tensorstore, listings through s3fs."""

    def __init__(self, params: Params, ctx: FetchContext) -> None:
        from ..io.http import RetryPolicy

        self.params, self.ctx = params, ctx
        policy = ctx.policy or RetryPolicy.from_env()
        # tensorstore has no request timeout of its own: bound each operation (tries x (connect + read + backoff)).
        self.timeout = policy.attempts * (policy.connect_timeout + policy.read_timeout + policy.max_delay)
        self._kv: Any = None
        self._fs: Any = None
        self._lock = threading.Lock()  # builds the transports once
        self._count_lock = threading.Lock()

    def url(self, key: str) -> str:
        return self.params.url(key)

    def _count(self, n: int = 1) -> None:
        with self._count_lock:
            self.ctx.other_requests += n

    @property
    def kv(self) -> Any:
        with self._lock:
            if self._kv is None:
                import tensorstore as ts

                spec: dict[str, Any] = {"driver": "s3", "bucket": self.params.bucket,
                                        "path": self.params.container + "/", "aws_region": self.params.region}
                if self.params.endpoint:
                    spec["endpoint"] = self.params.endpoint
                try:
                    self._kv = ts.KvStore.open(spec, context=ts.Context(self.ctx.tensorstore_context())).result(
                        timeout=self.timeout)
                except Exception as exc:
                    raise self._error(self.url(""), exc) from exc
            return self._kv

    def _error(self, url: str, exc: BaseException) -> FetchError:
        text = str(exc)
        code = re.search(r"http_response_code='(\d+)'", text)
        detail = text.split(" [", 1)[0].strip()
        detail = re.sub(r"^[A-Z_]+: ", "", detail)
        if "retry attempts failed" in detail:
            detail = detail.replace("All ", "failed after ").replace(" retry attempts failed:", " tries:", 1)
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self.timeout:.0f} s"
        status = f" (HTTP {code.group(1)})" if code and code.group(1) not in detail else ""
        hint = ("the bucket must allow anonymous reads (emdata never sends credentials)" if code and code.group(1) == "403"
                else "check the endpoint and the network, then fetch again (finished chunks are kept)")
        return FetchError(self.ctx.dataset, url, f"{detail[:240]}{status}", hint)

    def get(self, key: str) -> bytes | None:
        """The object at a container-relative key, or None when the service has no such object."""
        self._count()
        try:
            result = self.kv.read(key).result(timeout=self.timeout)
        except FetchError:
            raise
        except Exception as exc:
            raise self._error(self.url(key), exc) from exc
        return None if result.state == "missing" else bytes(result.value)

    def get_many(self, required: list[str], optional: list[str]) -> dict[str, bytes | None]:
        """Several small objects at once; a missing required one is a one-line FetchError."""
        futures = {}
        self._count(len(required) + len(optional))
        for key in [*required, *optional]:
            try:
                futures[key] = self.kv.read(key)
            except Exception as exc:
                raise self._error(self.url(key), exc) from exc
        out: dict[str, bytes | None] = {}
        for key, future in futures.items():
            try:
                result = future.result(timeout=self.timeout)
            except Exception as exc:
                raise self._error(self.url(key), exc) from exc
            out[key] = None if result.state == "missing" else bytes(result.value)
        for key in required:
            if out[key] is None and not key.endswith("/.zarray"):  # a level's .zarray: see select()
                group = key.rsplit("/", 1)[0]
                raise FetchError(self.ctx.dataset, self.url(key), f"no such object: {group!r} is not an OME-Zarr "
                                 f"group in bucket {self.params.bucket}", "check container, image and labels in "
                                 f"datasets.{self.ctx.dataset}.source (they are paths inside the bucket)")
        return out

    def listing(self, prefix: str) -> dict[str, tuple[int, str]]:
        """Container-relative key -> (size, ETag) of every object under ``prefix`` (ListObjectsV2, paged)."""
        with self._lock:
            if self._fs is None:
                self._fs = self.ctx.s3(endpoint_url=self.params.endpoint, region=self.params.region)
        full = f"{self.params.container}/{prefix}"
        found: dict[str, tuple[int, str]] = {}
        token = None
        while True:
            args = {"Bucket": self.params.bucket, "Prefix": full, **({"ContinuationToken": token} if token else {})}
            self._count()
            try:
                page = self._fs.call_s3("list_objects_v2", **args)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
                raise FetchError(self.ctx.dataset, f"s3://{self.params.bucket}/{full}", f"listing failed ({first})",
                                 "check the endpoint, region and bucket in params.yaml and the network") from exc
            for item in page.get("Contents", []):
                found[item["Key"][len(self.params.container) + 1:]] = (int(item["Size"]), str(item.get("ETag", "")))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found


@dataclass(frozen=True)
class _Chunk:
    array: str  # "raw" or "labels/<name>"
    key: str  # container-relative
    size: int
    etag: str


def _chunks(sel: Selection, bucket: _Bucket) -> tuple[list[_Chunk], dict[str, list[str]], int]:
    """The chunk objects the ROI touches that the service has; per array the absent ones; list requests."""
    present, absent, requests = [], {}, 0
    for name, array in sel.arrays.items():
        wanted = array.chunk_keys(sel.box)
        rows = array.chunk_rows(sel.box)
        listed: dict[str, tuple[int, str]] = {}
        for part in bucket.ctx.map(bucket.listing, [array.row_prefix(r) for r in rows]):
            listed.update(part)
        requests += len(rows)
        present += [_Chunk(name, k, *listed[k]) for k in wanted if k in listed]
        absent[name] = [k for k in wanted if k not in listed]
    return present, absent, requests


def _md5_ok(data: bytes, etag: str) -> bool:
    """A single-part S3 ETag is the MD5 of the object; others (multipart: ``...-N``) are not checked."""
    tag = etag.strip('"')
    if not re.fullmatch(r"[0-9a-f]{32}", tag):
        return True
    return hashlib.md5(data, usedforsecurity=False).hexdigest() == tag


def _local_file(ctx: FetchContext, relpath: str) -> Path | None:
    path = ctx.dest / relpath
    try:
        return path if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    bucket = _Bucket(params, ctx)
    sel = select(params, bucket.get_many, ctx.dataset, bucket.url)
    chunks, absent, list_requests = _chunks(sel, bucket)
    rows = []
    meta_size = sum(len(v) for v in sel.objects.values())
    required, optional = _metadata_keys(params)
    rows.append(FilePlan(f"metadata: {len(sel.objects)} objects", params.url(), meta_size, meta_size,
                         len(required) + len(optional), "new", files=len(sel.objects)))
    for name, array in sel.arrays.items():
        mine = [c for c in chunks if c.array == name]
        size = sum(c.size for c in mine)
        done = [c for c in mine if (f := _local_file(ctx, f"{params.local_root}/{c.key}")) and f.stat().st_size == c.size]
        left = size - sum(c.size for c in done)
        state = "done" if len(done) == len(mine) and mine else "resume" if done else "new"
        note = f" (+{len(absent[name])} absent: fill)" if absent[name] else ""
        rows.append(FilePlan(f"{name} {array.key.rsplit('/', 1)[-1]}: {len(mine)} chunks{note}",
                             params.url(array.key + "/"), size, left, len(mine) - len(done), state, files=len(mine)))
    rows[0] = FilePlan(rows[0].name, rows[0].url, rows[0].size, rows[0].to_transfer,
                       rows[0].requests + list_requests, rows[0].state, files=rows[0].files)
    return rows


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    bucket = _Bucket(params, ctx)
    sel = select(params, bucket.get_many, ctx.dataset, bucket.url)
    chunks, absent, _ = _chunks(sel, bucket)
    files: dict[str, FetchedFile] = {}
    for key, data in sorted(sel.objects.items()):
        target = ctx.path(f"{params.local_root}/{key}")
        _write(target, data)
        files[f"{params.local_root}/{key}"] = FetchedFile(bucket.url(key), len(data), hashlib.sha256(data).hexdigest())
    lock = threading.Lock()
    with ctx.progress(sum(c.size for c in chunks), f"{len(chunks)} chunk objects") as progress:

        def one(chunk: _Chunk) -> tuple[str, FetchedFile]:
            rel = f"{params.local_root}/{chunk.key}"
            target = ctx.path(rel)
            data = None
            if target.is_file() and target.stat().st_size == chunk.size:
                data = target.read_bytes()  # finished by an interrupted fetch: keep it if it is intact
                if not _md5_ok(data, chunk.etag):
                    data = None
            if data is None:
                data = bucket.get(chunk.key)
                url = bucket.url(chunk.key)
                if data is None:
                    raise FetchError(ctx.dataset, url, f"no such object (404 NoSuchKey) in bucket {params.bucket}, "
                                     "although its listing named it", "the data changed on the server during the "
                                     "fetch; run the fetch again")
                if len(data) != chunk.size or not _md5_ok(data, chunk.etag):
                    raise IntegrityError(ctx.dataset, url, f"got {len(data)} bytes (MD5 "
                                         f"{hashlib.md5(data, usedforsecurity=False).hexdigest()}); the listing "
                                         f"says {chunk.size} bytes, ETag {chunk.etag}",
                                         "the object changed on the server or was damaged on the way; fetch again")
                _write(target, data)
            with lock:
                progress.update(chunk.size)
            return rel, FetchedFile(bucket.url(chunk.key), len(data), hashlib.sha256(data).hexdigest())

        files.update(ctx.map(one, chunks))
    arrays = {name: {"array": params.url(a.key), "chunks": len([c for c in chunks if c.array == name]),
                     "absent_chunks": absent[name], "bytes": sum(c.size for c in chunks if c.array == name)}
              for name, a in sel.arrays.items()}
    sources = {}
    for name, a in sel.arrays.items():  # one digest per array over its fetched objects, for the HDF5's attributes
        lines = "".join(f"{k} {f.size} {f.sha256}\n" for k, f in sorted(files.items())
                        if k.startswith(f"{params.local_root}/{a.key}/"))
        sources[params.url(a.key)] = hashlib.sha256(lines.encode()).hexdigest()
    extra = {"endpoint": params.endpoint, "region": params.region, "level": params.level,
             "roi_voxels": {"start": list(sel.box[0]), "stop": list(sel.box[1])}, "arrays": arrays,
             "sources": sources}
    return ctx.record(files, extra)


def _write(target: Path, data: bytes) -> None:
    """Write under a temporary name and rename: a file with the final name is always complete."""
    import os

    tmp = target.with_name(target.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)


# -- the local copy -----------------------------------------------------------------------------


def _local_selection(params: Params, raw: Path, dataset: str) -> Selection:
    root = raw / params.local_root

    def where(key: str) -> str:
        return str(root / key)

    def read(required: list[str], optional: list[str]) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for key in [*required, *optional]:
            try:
                out[key] = (root / key).read_bytes()
            except FileNotFoundError:
                out[key] = None
        for key in required:
            if out[key] is None:
                raise FormatError(dataset, where(key), "is missing from the fetched copy",
                                  f"fetch the dataset again (`emdata fetch {dataset}`)")
        return out

    return select(params, read, dataset, where)


def open_volume(params: Params, raw: Path, dataset: str) -> "ZarrVolume":
    from ..io.zarr import ZarrVolume

    sel = _local_selection(params, raw, dataset)
    voxel, offset = sel.geometry()
    return ZarrVolume(raw / params.local_root / sel.array.key, dataset, start=sel.box[0], stop=sel.box[1],
                      voxel_size_nm=voxel, offset_nm=offset)


def open_labels(params: Params, raw: Path, dataset: str) -> "dict[str, RawVolume]":
    from ..io.zarr import ZarrVolume

    sel = _local_selection(params, raw, dataset)
    voxel, offset = sel.geometry()
    return {name: ZarrVolume(raw / params.local_root / array.key, dataset, start=sel.box[0], stop=sel.box[1],
                             voxel_size_nm=voxel, offset_nm=offset) for name, (_, array) in sel.labels.items()}


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    sel = _local_selection(params, raw, dataset)
    return {"ome_zarr": {key: json.loads(data) for key, data in sorted(sel.objects.items())},
            "roi_voxels": {"start": list(sel.box[0]), "stop": list(sel.box[1]), "level": params.level}}


def describe(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    sel = _local_selection(params, raw, dataset)
    return {"ngff_version": sel.image.version, "image": params.url(params.image), "level": params.level,
            "roi_start_voxels": list(sel.box[0]), "roi_shape_voxels": [b - a for a, b in zip(*sel.box)],
            "stored_dtype": sel.array.dtype, "stored_chunks": list(sel.array.chunks),
            "compressor": json.dumps(sel.array.zarray.get("compressor"), sort_keys=True)}
