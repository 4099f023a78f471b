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
needed; no instance-metadata probe). Objects and the chunk listing of ``fetch`` go through
tensorstore's ``s3`` key-value store (bounded retries with backoff for SlowDown/5xx and dropped
connections, concurrent, C++ fast); ``plan`` lists through s3fs/botocore, which gives sizes.
Chunks go through the object copy every array source shares (:mod:`emdata.sources.fetch.objects`:
a window of reads in flight; each chunk written under a temporary name, renamed, and journalled
with its sha256), so an interrupted fetch resumes without requesting finished chunks again (a
kept chunk must still hash as journalled). Which chunks and what geometry: :mod:`emdata.formats.ome_zarr`. ``plan`` reads only metadata and listings and reports chunk counts and bytes.

Labels are chosen by name: ``labels`` maps the name the product gives a label (``/labels/<name>``)
to a label array of the recon, any multiscale group under ``<recon>/labels/``. ``plan`` lists the
ones the source has (:func:`label_arrays`: a delimiter listing of that group, reading each
subgroup's ``multiscales``), and a path the source does not have is one line naming those it has.

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
      labels: {nucleus: recon-2/labels/inference/segmentations/nuc}   # `emdata plan` lists the others
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emdata.params.schema import (
    Section,
    as_matching,
    as_named,
    as_str,
    as_triple,
    as_url,
    config_error,
    param,
    read_params,
)
from emdata.errors import ConfigError, FetchError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.digests import GROUPS, group_digests
from emdata.sources.fetch.record import FetchedFile, FetchRecord, safe_relpath
from emdata.formats.ome_zarr import Selection, local_selection, metadata_keys, select
from emdata.formats.raw import RawVolume
from emdata.formats.zarr import ZarrVolume
from emdata.sources.fetch.files import FilePlan
from emdata.sources.fetch.objects import copy_objects, journalled, store_object
from emdata.transport.s3 import S3Folder

KIND = "ome_zarr_s3"
# formats.ngff and formats.ome_zarr decide which chunk objects a fetch copies as well as the geometry
# normalize writes, so the fetch fingerprint includes the readers too (pipeline/code/ome_zarr_s3-fetch.json).
READERS = ("emdata.formats.ngff", "emdata.formats.ome_zarr", "emdata.formats.zarr")
DECODES_ON_FETCH = True
READS_PER_WORKER = 4  # chunk GETs in flight per worker (EMDATA_FETCH_WORKERS) while workers write and hash
_BUCKET = re.compile(r"^(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # no ".." anywhere
_LEVEL = re.compile(r"^[A-Za-z0-9_.-]+$")
_REGION = re.compile(r"^[a-z0-9-]+$")
LABEL_DEPTH = 4  # groups below the recon's labels/ group a listing enters (inference/segmentations/<array>)
LABEL_GROUPS = 400  # groups a listing visits at most (a request each)
Triple = tuple[float, float, float]


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


def as_key_path(value: Any, path: str) -> str:
    """A key path inside the bucket (no leading ``/``, no ``..``)."""
    text = as_str(value, path)
    return safe_relpath(text, f"params.yaml: {path} (a key path inside the bucket, no leading '/')")


def _voxels(positive: bool) -> Callable[[Any, str], Triple]:
    def parse(value: Any, path: str) -> Triple:
        ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and (v > 0 if positive else v >= 0) for v in value)
        if not ok:
            kind = "positive" if positive else "non-negative"
            raise config_error(path, f"expected three {kind} integers [z, y, x] (voxels), got {value!r}")
        return tuple(float(v) for v in value)  # type: ignore[return-value]

    return parse


def as_roi(unit: str) -> Callable[[Any, str], Roi]:
    """``{start, shape}`` in ``unit`` (``voxel``: integers; ``nm``: numbers)."""
    start, shape = (_voxels(False), _voxels(True)) if unit == "voxel" else (as_triple(False), as_triple(True))

    def parse(value: Any, path: str) -> Roi:
        sec = Section(value, path)
        roi = Roi(sec.required("start", start), sec.required("shape", shape), unit)
        sec.finish()
        return roi

    return parse


@dataclass(frozen=True)
class Params:
    bucket: str = param(as_matching(_BUCKET, "an S3 bucket name (3-63 of a-z 0-9 . -)"))
    container: str = param(as_key_path)  # key prefix of the zarr container inside the bucket
    image: str = param(as_key_path)  # the image group inside the container
    level: str = param(as_matching(_LEVEL, "a level path of the multiscale such as s0"))
    region: str = param(as_matching(_REGION, "an AWS region name such as us-east-1"))
    endpoint: str | None = param(as_url, None)  # None: AWS for the region
    labels: dict[str, str] = param(as_named(as_key_path), {})  # name -> label group inside the container
    roi: Roi | None = None  # ``roi`` (voxels) or ``roi_nm``, read by parse_params; None: the whole level

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


def parse_params(sec: Section) -> Params:
    roi, roi_nm = sec.optional("roi", as_roi("voxel")), sec.optional("roi_nm", as_roi("nm"))
    if roi and roi_nm:
        raise config_error(sec.key_path("roi_nm"), "give the region either in voxels (roi) or in nm (roi_nm), not both")
    return read_params(Params, sec, roi=roi or roi_nm)


# -- plan and fetch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    array: str  # "raw" or "labels/<name>"
    key: str  # container-relative
    size: int
    relpath: str  # in the raw folder
    url: str


def _folder(params: Params, ctx: FetchContext) -> S3Folder:
    return S3Folder(ctx, bucket=params.bucket, prefix=params.container, region=params.region, endpoint=params.endpoint,
                    requests_in_flight=READS_PER_WORKER * max(1, ctx.workers))


def labels_root(image: str) -> str:
    """The recon's label group: OpenOrganelle keeps ``<recon>/labels/`` beside ``<recon>/em/``, so it is
    the first component of the image group plus ``/labels`` (for a one-component image, NGFF's own place)."""
    return image.split("/", 1)[0] + "/labels"


def _is_multiscale(data: bytes | None) -> bool:
    try:
        attrs = json.loads(data) if data is not None else None
    except ValueError:
        return False
    return isinstance(attrs, dict) and isinstance(attrs.get("multiscales"), list)


def label_arrays(params: Params, folder: S3Folder) -> list[str]:
    """Container-relative paths of the multiscale groups under :func:`labels_root`, from the listing.

    Breadth first, one delimiter listing per group and one ``.zattrs`` read per subgroup; a group
    whose ``.zattrs`` has ``multiscales`` is a label array (its levels are not entered), any other
    is entered, at most LABEL_DEPTH groups deep and LABEL_GROUPS groups in all.
    """
    found: list[str] = []
    frontier, visited = [labels_root(params.image) + "/"], 0
    for _ in range(LABEL_DEPTH):
        groups = [g for part in folder.ctx.map(folder.folders, frontier) for g in part][:LABEL_GROUPS - visited]
        visited += len(groups)
        attrs = folder.get_many([f"{g}.zattrs" for g in groups])
        found += [g.rstrip("/") for g in groups if _is_multiscale(attrs[f"{g}.zattrs"])]
        frontier = [g for g in groups if not _is_multiscale(attrs[f"{g}.zattrs"])]
        if not frontier or visited >= LABEL_GROUPS:
            break
    return sorted(found)


def _unknown_label(params: Params, folder: S3Folder, dataset: str, name: str) -> ConfigError:
    have = label_arrays(params, folder)
    return ConfigError(f"params.yaml: datasets.{dataset}.source.labels.{name}: {params.labels[name]!r} is not a label "
                       f"array of {params.url()} (it has: {', '.join(have) or 'none under ' + labels_root(params.image)})")


def _remote_selection(params: Params, folder: S3Folder, dataset: str) -> Selection:
    def missing(key: str, what: str) -> Exception:
        label = next((name for name, group in params.labels.items() if key == f"{group}/.zattrs"), None)
        if label is not None:  # a label group the source does not have: say which ones it has
            return _unknown_label(params, folder, dataset, label)
        return FetchError(dataset, folder.url(key), f"no such object in bucket {params.bucket}: {what}",
                          f"check container, image, level and labels in datasets.{dataset}.source "
                          "(paths inside the bucket)")

    return select(params, folder.get_many(metadata_keys(params)), dataset, folder.url, missing)


def _chunks(params: Params, sel: Selection, bucket: S3Folder, *,
            sizes: bool) -> tuple[list[_Chunk], dict[str, list[str]], int]:
    """The chunk objects the ROI touches that the service has; per array the absent ones; list requests.

    One listing per chunk row in Z of each array (``<array>/<z><separator>``), all on the worker
    pool: with sizes and ETags through s3fs (``plan``), or keys only through tensorstore (``fetch``,
    which learns sizes from the objects themselves; botocore's client and XML parsing cost more CPU
    than a whole ROI's transfer checks).
    """
    prefixes = [a.row_prefix(r) for a in sel.arrays.values() for r in a.chunk_rows(sel.box)]
    listed: dict[str, tuple[int, str]] = {}
    for part in bucket.ctx.map(bucket.listing if sizes else bucket.keys, prefixes):
        listed.update(part)
    present, absent = [], {}
    for name, array in sel.arrays.items():
        wanted = array.chunk_keys(sel.box)
        present += [_Chunk(name, k, listed[k][0], f"{params.local_root}/{k}", bucket.url(k))
                    for k in wanted if k in listed]
        absent[name] = [k for k in wanted if k not in listed]
    return present, absent, len(prefixes)


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    bucket = _folder(params, ctx)
    bucket.prepare_listing()  # while the metadata arrives
    sel = _remote_selection(params, bucket, ctx.dataset)
    chunks, absent, list_requests = _chunks(params, sel, bucket, sizes=True)
    meta_size = sum(len(v) for v in sel.objects.values())
    rows = [FilePlan(f"metadata: {len(sel.objects)} objects", params.url(), meta_size, meta_size,
                     len(metadata_keys(params)) + list_requests, "new", files=len(sel.objects))]
    kept = journalled(ctx)
    for name, array in sel.arrays.items():
        mine = [c for c in chunks if c.array == name]
        done = [c for c in mine if kept.get(c.relpath) == c.size]
        state = "done" if len(done) == len(mine) and mine else "resume" if done else "new"
        note = f" (+{len(absent[name])} absent: fill)" if absent[name] else ""
        rows.append(FilePlan(f"{name} {array.key.rsplit('/', 1)[-1]}: {len(mine)} chunks{note}",
                             params.url(array.key + "/"), sum(c.size for c in mine),
                             sum(c.size for c in mine) - sum(c.size for c in done), len(mine) - len(done), state,
                             files=len(mine)))
    return rows


def plan_notes(params: Params, ctx: FetchContext) -> list[str]:
    """The label arrays the source has, each with the name params.yaml gives it (``-``: not chosen)."""
    have = label_arrays(params, _folder(params, ctx))
    names = {group: name for name, group in params.labels.items()}
    return [f"label arrays under {params.url(labels_root(params.image))}/: {len(have)} "
            "(choose with source.labels: {<name>: <path>})"] + [f"  {names.get(g, '-'):<12} {g}" for g in have]


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    bucket = _folder(params, ctx)
    sel = _remote_selection(params, bucket, ctx.dataset)
    chunks, absent, _ = _chunks(params, sel, bucket, sizes=False)
    files: dict[str, FetchedFile] = {}
    for key, data in sorted(sel.objects.items()):
        files[f"{params.local_root}/{key}"] = store_object(ctx, f"{params.local_root}/{key}", bucket.url(key), data)

    def start(chunk: _Chunk) -> Callable[[], bytes]:
        future = bucket.read_async(chunk.key)  # a window of reads in flight while workers write and hash

        def read() -> bytes:
            data = bucket.result(chunk.key, future)
            if data is None:
                raise FetchError(ctx.dataset, chunk.url, f"no such object (404 NoSuchKey) in bucket {params.bucket}, "
                                 "although its listing named it", "the data changed on the server during the fetch; "
                                 "run the fetch again")
            return data

        return read

    files.update(copy_objects(ctx, chunks, start, desc="chunk objects", unit="chunk",
                              window=READS_PER_WORKER * max(1, ctx.workers)))
    arrays = {name: {"array": params.url(a.key), "chunks": len([c for c in chunks if c.array == name]),
                     "absent_chunks": absent[name],
                     "bytes": sum(files[c.relpath].size for c in chunks if c.array == name)}
              for name, a in sel.arrays.items()}
    extra = {"endpoint": params.endpoint, "region": params.region, "level": params.level,
             "roi_voxels": {"start": list(sel.box.start), "stop": list(sel.box.stop)}, "arrays": arrays,
             GROUPS: group_digests(files, [params.url(a.key) for a in sel.arrays.values()])}  # per array: .zarray + chunks
    return ctx.record(files, extra)


# -- the local copy -----------------------------------------------------------------------------


def open_volume(params: Params, raw: Path, dataset: str) -> ZarrVolume:
    sel = local_selection(params, raw / params.local_root, dataset)
    voxel, offset = sel.geometry()
    return ZarrVolume(raw / params.local_root / sel.array.key, dataset, start=sel.box.start, stop=sel.box.stop,
                      voxel_size_nm=voxel, offset_nm=offset)


def open_labels(params: Params, raw: Path, dataset: str) -> dict[str, RawVolume]:
    sel = local_selection(params, raw / params.local_root, dataset)
    voxel, offset = sel.geometry()
    return {name: ZarrVolume(raw / params.local_root / array.key, dataset, start=sel.box.start, stop=sel.box.stop,
                             voxel_size_nm=voxel, offset_nm=offset) for name, (_, array) in sel.labels.items()}


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    sel = local_selection(params, raw / params.local_root, dataset)
    return {"ome_zarr": {key: json.loads(data) for key, data in sorted(sel.objects.items())},
            "roi_voxels": {"start": list(sel.box.start), "stop": list(sel.box.stop), "level": params.level}}


def describe(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    sel = local_selection(params, raw / params.local_root, dataset)
    return {"ngff_version": sel.image.version, "image": params.url(params.image), "level": params.level,
            "roi_start_voxels": list(sel.box.start), "roi_shape_voxels": list(sel.box.shape),
            "stored_dtype": sel.array.dtype, "stored_chunks": list(sel.array.chunks),
            "compressor": json.dumps(sel.array.zarray.get("compressor"), sort_keys=True)}
