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
Each chunk is written under a temporary name, renamed, and journalled with its sha256, so an
interrupted fetch resumes without requesting finished chunks again (a kept chunk must still hash
as journalled). ``plan`` reads only metadata and listings and reports chunk counts and bytes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
from emdata.errors import ConfigError, FetchError, FormatError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile, FetchRecord, safe_relpath
from emdata.formats.ngff import (
    ArrayInfo,
    Level,
    Multiscale,
    parse_json,
    parse_multiscales,
    parse_zarray,
    same_grid,
)
from emdata.sources.fetch.files import FilePlan

if TYPE_CHECKING:
    from emdata.transport.s3 import S3Folder
    from emdata.formats.zarr import ZarrVolume
    from emdata.formats.raw import RawVolume

KIND = "ome_zarr_s3"
# io.ngff decides which chunk objects a fetch copies as well as the geometry normalize writes, so
# the fetch fingerprint includes the readers too (pipeline/code/ome_zarr_s3-fetch.json).
READERS = ("emdata.formats.ngff", "emdata.formats.zarr")
DECODES_ON_FETCH = True
READS_PER_WORKER = 4  # chunk GETs in flight per worker (EMDATA_FETCH_WORKERS) while workers write and hash
_BUCKET = re.compile(r"^(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # no ".." anywhere
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


# -- the region and the metadata it needs --------------------------------------------------------


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


def metadata_keys(params: Params) -> list[str]:
    """Container-relative keys of the metadata a fetch copies (groups' and the level's arrays')."""
    groups = [params.image, *params.labels.values()]
    keys = {".zgroup"}
    for g in groups:
        keys.update({f"{g}/.zattrs", f"{g}/.zgroup", f"{g}/{params.level}/.zarray", f"{g}/{params.level}/.zattrs"})
        parts = g.split("/")  # the groups on the way, so the local copy opens as a zarr hierarchy
        keys.update(f"{'/'.join(parts[:i])}/.zgroup" for i in range(1, len(parts)))
    return sorted(keys)


Missing = Callable[[str, str], Exception]  # (key, what is missing) -> the error to raise


def select(params: Params, objects: dict[str, bytes | None], dataset: str, where: Callable[[str], str],
           missing: Missing) -> Selection:
    """Check the metadata (``objects``: key -> bytes, None if absent), choose the level, place the ROI."""
    import numpy as np

    def document(key: str, what: str) -> dict[str, Any]:
        data = objects.get(key)
        if data is None:
            raise missing(key, what)
        return parse_json(data, where(key), dataset)

    attrs_key = f"{params.image}/.zattrs"
    image = parse_multiscales(document(attrs_key, f"{params.image!r} is not an OME-Zarr group (no .zattrs)"),
                              params.image, where(attrs_key), dataset)
    if params.level not in image.levels:
        raise ConfigError(f"params.yaml: datasets.{dataset}.source.level: {params.level!r} is not a level of "
                          f"{params.url(params.image)} (levels: {', '.join(image.levels)})")
    level = image.levels[params.level]
    arr_key = f"{params.image}/{params.level}"
    array = parse_zarray(document(f"{arr_key}/.zarray", f"the multiscales lists level {params.level!r}, but "
                                  "its .zarray is missing"), arr_key, image.lead, where(f"{arr_key}/.zarray"), dataset)
    box = voxel_box(params, level, array.space_shape, dataset)
    labels = {}
    for name, group in params.labels.items():
        key = f"{group}/.zattrs"
        ms = parse_multiscales(document(key, f"label {name!r}: {group!r} is not an OME-Zarr group (no .zattrs)"),
                               group, where(key), dataset)
        lab_level = ms.levels.get(params.level)
        zkey = f"{group}/{params.level}/.zarray"
        if lab_level is None or objects.get(zkey) is None:
            raise FormatError(dataset, where(key), f"label {name!r} has no level {params.level!r} "
                              f"(levels: {', '.join(ms.levels)})", "choose a level both the image and the labels have")
        lab = parse_zarray(document(zkey, ""), f"{group}/{params.level}", ms.lead, where(zkey), dataset)
        same = (lab_level.in_nm == level.in_nm and same_grid(lab_level.scale, level.scale, level.scale)
                and same_grid(lab_level.translation, level.translation, level.scale))
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
    return Selection(image, level, array, box, labels, {k: v for k, v in objects.items() if v is not None})


# -- plan and fetch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    array: str  # "raw" or "labels/<name>"
    key: str  # container-relative
    size: int
    etag: str


def _folder(params: Params, ctx: FetchContext) -> "S3Folder":
    from emdata.transport.s3 import S3Folder

    return S3Folder(ctx, bucket=params.bucket, prefix=params.container, region=params.region, endpoint=params.endpoint,
                    requests_in_flight=READS_PER_WORKER * max(1, ctx.workers))


def _remote_selection(params: Params, folder: "S3Folder", dataset: str) -> Selection:
    def missing(key: str, what: str) -> Exception:
        return FetchError(dataset, folder.url(key), f"no such object in bucket {params.bucket}: {what}",
                          f"check container, image, level and labels in datasets.{dataset}.source "
                          "(paths inside the bucket)")

    return select(params, folder.get_many(metadata_keys(params)), dataset, folder.url, missing)


def _chunks(sel: Selection, bucket: "S3Folder", *, sizes: bool) -> tuple[list[_Chunk], dict[str, list[str]], int]:
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
        present += [_Chunk(name, k, *listed[k]) for k in wanted if k in listed]
        absent[name] = [k for k in wanted if k not in listed]
    return present, absent, len(prefixes)


def _local_file(ctx: FetchContext, relpath: str) -> Path | None:
    path = ctx.dest / relpath
    try:
        return path if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    bucket = _folder(params, ctx)
    bucket.prepare_listing()  # while the metadata arrives
    sel = _remote_selection(params, bucket, ctx.dataset)
    chunks, absent, list_requests = _chunks(sel, bucket, sizes=True)
    rows = []
    meta_size = sum(len(v) for v in sel.objects.values())
    rows.append(FilePlan(f"metadata: {len(sel.objects)} objects", params.url(), meta_size, meta_size,
                         len(metadata_keys(params)), "new", files=len(sel.objects)))
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


JOURNAL = ".emdata-chunks.jsonl"  # in the partial folder: chunks finished and how they hashed


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    bucket = _folder(params, ctx)
    sel = _remote_selection(params, bucket, ctx.dataset)
    chunks, absent, _ = _chunks(sel, bucket, sizes=False)
    files: dict[str, FetchedFile] = {}
    for key, data in sorted(sel.objects.items()):
        target = ctx.path(f"{params.local_root}/{key}")
        _write(target, data)
        files[f"{params.local_root}/{key}"] = FetchedFile(bucket.url(key), len(data), hashlib.sha256(data).hexdigest())
    journal = _Journal(ctx.dest / JOURNAL)
    with ctx.progress(len(chunks), "chunk objects", unit="chunk") as progress:

        def keep(chunk: _Chunk) -> tuple[str, FetchedFile] | None:
            """A chunk an interrupted fetch finished, if it is as that fetch wrote it (size and sha256)."""
            rel = f"{params.local_root}/{chunk.key}"
            entry = journal.finished.get(chunk.key)
            if entry is None or not (ctx.dest / rel).is_file():
                return None
            data = ctx.path(rel).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != entry["size"] or digest != entry["sha256"]:
                return None
            journal.progress(progress)
            return rel, FetchedFile(bucket.url(chunk.key), len(data), digest)

        def store(chunk: _Chunk, data: bytes | None, etag: str) -> tuple[str, FetchedFile]:
            if data is None:
                raise FetchError(ctx.dataset, bucket.url(chunk.key), f"no such object (404 NoSuchKey) in bucket "
                                 f"{params.bucket}, although its listing named it", "the data changed on the "
                                 "server during the fetch; run the fetch again")
            rel = f"{params.local_root}/{chunk.key}"
            _write(ctx.path(rel), data)
            digest = hashlib.sha256(data).hexdigest()
            journal.add(chunk.key, len(data), digest, etag)
            journal.progress(progress)
            return rel, FetchedFile(bucket.url(chunk.key), len(data), digest)

        kept = ctx.map(keep, chunks) if journal.finished else [None] * len(chunks)
        files.update(k for k in kept if k is not None)
        try:
            files.update(_download(ctx, bucket, [c for c, k in zip(chunks, kept) if k is None], store))
        finally:
            journal.close()
    (ctx.dest / JOURNAL).unlink(missing_ok=True)  # the raw folder holds the record, not the journal
    chunk_files = {f"{params.local_root}/{c.key}": c.array for c in chunks}
    arrays = {name: {"array": params.url(a.key), "chunks": len([c for c in chunks if c.array == name]),
                     "absent_chunks": absent[name],
                     "bytes": sum(files[rel].size for rel, owner in chunk_files.items() if owner == name)}
              for name, a in sel.arrays.items()}
    sources = {}  # one digest per array over its objects (.zarray too), kept in the record
    for name, a in sel.arrays.items():
        lines = "".join(f"{k} {f.size} {f.sha256}\n" for k, f in sorted(files.items())
                        if k.startswith(f"{params.local_root}/{a.key}/"))
        sources[params.url(a.key)] = hashlib.sha256(lines.encode()).hexdigest()
    extra = {"endpoint": params.endpoint, "region": params.region, "level": params.level,
             "roi_voxels": {"start": list(sel.box[0]), "stop": list(sel.box[1])}, "arrays": arrays,
             "array_digests": sources}
    return ctx.record(files, extra)


class _Journal:
    """One JSON line per chunk written (key, size, sha256, ETag): what a resumed fetch may keep.

    A chunk file is written under a temporary name and renamed, then journalled; a resumed fetch
    keeps a file only if it still hashes as journalled, so a damaged or unjournalled file is fetched
    again and no request is spent on checking the others.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished: dict[str, dict[str, Any]] = {}
        if path.is_file() and not path.is_symlink():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.finished[str(entry["key"])] = {"size": int(entry["size"]), "sha256": str(entry["sha256"])}
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by the interruption
        self._lock = threading.Lock()
        self._fh = open(path, "a", encoding="utf-8")

    def add(self, key: str, size: int, sha256: str, etag: str) -> None:
        line = json.dumps({"key": key, "size": size, "sha256": sha256, "etag": etag})
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def progress(self, progress: Any) -> None:
        with self._lock:
            progress.update(1)

    def close(self) -> None:
        self._fh.close()


def _download(ctx: FetchContext, bucket: "S3Folder", chunks: list[_Chunk],
              store: Callable[[_Chunk, bytes | None, str], tuple[str, FetchedFile]]) -> list[tuple[str, FetchedFile]]:
    """GET ``chunks`` with a window of reads in flight, and ``store`` each on the worker threads.

    The window keeps the transport busy while earlier objects are checked, written and hashed.
    After the first error no new read starts; reads already under way finish and are stored (so a
    resumed fetch need not repeat them), then the error is raised.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    window = READS_PER_WORKER * max(1, ctx.workers)
    todo = iter(chunks)
    reads: deque[tuple[_Chunk, Any]] = deque()
    stored: list[Future] = []
    checked = 0
    error: BaseException | None = None
    with ThreadPoolExecutor(max(1, ctx.workers), thread_name_prefix="emdata-store") as pool:
        while True:
            while error is None and len(reads) < window and (chunk := next(todo, None)) is not None:
                reads.append((chunk, bucket.read_async(chunk.key)))
            if not reads:
                break
            chunk, future = reads.popleft()
            try:
                stored.append(pool.submit(store, chunk, *bucket.result_and_etag(chunk.key, future)))
            except FetchError as exc:
                error = error or exc
            while checked < len(stored) and stored[checked].done():  # a failed store stops new reads too
                error = error or stored[checked].exception()
                checked += 1
        results = []
        for f in stored:
            try:
                results.append(f.result())
            except Exception as exc:  # noqa: BLE001 - the first error is raised below
                error = error or exc
    if error is not None:
        raise error
    return results


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

    def missing(key: str, what: str) -> Exception:
        return FormatError(dataset, where(key), "is missing from the fetched copy",
                           f"fetch the dataset again (`emdata fetch {dataset}`)")

    objects: dict[str, bytes | None] = {}
    for key in metadata_keys(params):
        path = root / key
        objects[key] = path.read_bytes() if path.is_file() else None
    return select(params, objects, dataset, where, missing)


def open_volume(params: Params, raw: Path, dataset: str) -> "ZarrVolume":
    from emdata.formats.zarr import ZarrVolume

    sel = _local_selection(params, raw, dataset)
    voxel, offset = sel.geometry()
    return ZarrVolume(raw / params.local_root / sel.array.key, dataset, start=sel.box[0], stop=sel.box[1],
                      voxel_size_nm=voxel, offset_nm=offset)


def open_labels(params: Params, raw: Path, dataset: str) -> "dict[str, RawVolume]":
    from emdata.formats.zarr import ZarrVolume

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
