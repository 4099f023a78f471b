"""Offline replica of OpenOrganelle's anonymous S3 bucket (``janelia-cosem-datasets``).

The real key layout (``jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/s0 ... s8`` and
the nucleus label pyramid ``recon-2/labels/inference/segmentations/nuc``, plus a uint64 instance
pyramid ``.../mito`` so a dataset can choose another label array), the real NGFF 0.4
``multiscales`` (the nine scales and translations exactly as the service writes them, floats such
as ``11.840000000000002`` included) and zarr v2 ``.zarray`` documents (``<i2``, Zstd level 1,
fill value 0, order C), holding a scaled-down generated int16 volume: odd, non-cubic shapes, a
non-cubic chunk shape, levels halving as the real ones do (but never below one voxel), the image
with ``dimension_separator`` ``/`` and the labels with ``.``, and one chunk of s0 missing (all
fill value, so the service has no object for it, as zarr specifies).

The server is a real S3 implementation, SeaweedFS (``testing/s3.py``), not a mock: listings with
ETags and continuation tokens, Range, ``NoSuchKey`` documents and anonymous access behave as an
S3 server's do, and the same server carries the benchmark. Moto was the alternative; it runs in
the test process (its request handling competes with the client under test for the GIL), needs
a public-read ACL per object, and took ~16 ms per upload here against SeaweedFS's ~5 ms. Starting
and stopping SeaweedFS costs ~3 s, so one anonymous SeaweedFS per process and data variant holds
the data (uploaded once, never modified), and each ``start()`` puts its own
:class:`~emdata.testing.s3.S3Front` before it: a fresh request log and fresh fault injection
(SlowDown/5xx, connections dropped mid-object, vanished objects, signed requests refused as AWS
refuses unknown credentials) for every test, in well under a second. Nothing starts at import.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from emdata.errors import EmdataError
from emdata.testing.registry import ReplicaCase
from emdata.testing.s3 import S3Front, SeaweedS3, shared_anonymous_s3
from emdata.testing.volumes import blob_labels, coordinate_volume, em_like_volume

BUCKET = "janelia-cosem-datasets"
REGION = "us-east-1"
CONTAINER = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr"
IMAGE = "recon-2/em/fibsem-int16"
NUCLEUS = "recon-2/labels/inference/segmentations/nuc"
MITO = "recon-2/labels/inference/segmentations/mito"  # a second label array: uint64 instance ids
MITO_IDS = (2**40 + 17, 2**40 + 4099, 2**63 + 5)  # beyond uint32, one beyond int64
# The service's own numbers (../shared/reference/openorganelle_jrc_mus-nacc-2_fibsem-int16.json).
REAL_SCALES = [(2.96, 4.0, 4.0), (5.92, 8.0, 8.0), (11.840000000000002, 16.0, 16.0), (23.68, 32.0, 32.0),
               (47.36, 64.0, 64.0), (94.72, 128.0, 128.0), (189.44, 256.0, 256.0),
               (378.8799999999999, 512.0, 512.0), (757.7599999999999, 1024.0, 1024.0)]
REAL_TRANSLATIONS = [(0.0, 0.0, 0.0), (1.48, 2.0, 2.0), (4.4399999999999995, 6.0, 6.0), (10.36, 14.0, 14.0),
                     (22.2, 30.0, 30.0), (45.88, 62.0, 62.0), (93.24, 126.0, 126.0), (187.96, 254.0, 254.0),
                     (377.4, 510.0, 510.0)]
REAL_SHAPES = [(564, 2520, 2596), (282, 1260, 1298), (141, 630, 649), (70, 315, 324), (35, 157, 162),
               (17, 78, 81), (8, 39, 40), (4, 19, 20), (2, 9, 10)]
LEVELS = [f"s{i}" for i in range(9)]
VARIANTS = {  # s0 shape, chunk shape, the s0 chunk that is missing
    "test": ((37, 61, 83), (8, 12, 16), (1, 2, 3)),
    "demo": ((96, 256, 280), (16, 32, 32), (2, 3, 4)),
}
# Contract cases (tests): an odd ROI at s0 that holds the missing chunk, and the whole of s1.
CASES = {
    "openorganelle_jrc_mus_nacc_2": ("s0", {"start": [3, 17, 21], "shape": [21, 30, 50]}),
    "openorganelle_jrc_mus_nacc_2_s1": ("s1", None),
}


def level_shapes(s0: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Each level halves the one before, rounding down as the service does (never below one voxel)."""
    shapes = [s0]
    for _ in LEVELS[1:]:
        shapes.append(tuple(max(1, n // 2) for n in shapes[-1]))  # type: ignore[arg-type]
    return shapes


def multiscales(name: str) -> dict[str, Any]:
    """A group's ``.zattrs`` as the service writes it (NGFF 0.4)."""
    datasets = [{"coordinateTransformations": [{"scale": list(s), "type": "scale"},
                                               {"translation": list(t), "type": "translation"}], "path": p}
                for p, s, t in zip(LEVELS, REAL_SCALES, REAL_TRANSLATIONS)]
    axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
    return {"multiscales": [{"axes": axes, "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
                             "datasets": datasets, "metadata": None, "name": name, "type": None, "version": "0.4"}]}


def mitochondria(shape: tuple[int, int, int]) -> np.ndarray:
    """A few elongated uint64 objects (instance labels, as CellMap's ``mito`` segmentations are)."""
    rng = np.random.default_rng(11)
    grid = np.indices(shape, dtype=np.float64)
    ids = np.zeros(shape, np.uint64)
    for object_id in MITO_IDS:
        centre = [rng.uniform(0.2 * n, 0.8 * n) for n in shape]
        radius = [max(1.5, n / f) for n, f in zip(shape, (4, 8, 3))]
        ids[sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) <= 1] = object_id
    return ids


def downsampled(volume: np.ndarray, s0_shape: tuple[int, int, int]) -> list[np.ndarray]:
    """Every level of ``volume`` (s0): every 2^k-th voxel, cropped to the level's shape."""
    return [np.ascontiguousarray(volume[::2 ** k, ::2 ** k, ::2 ** k][tuple(slice(0, n) for n in shape)])
            for k, shape in enumerate(level_shapes(s0_shape))]


def pyramid(variant: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Image (int16) and nucleus labels (uint8) at every level of a variant."""
    s0_shape, chunks, missing = VARIANTS[variant]
    if variant == "test":
        image = coordinate_volume(s0_shape, np.int16)
        labels = blob_labels(s0_shape, seed=3, count=2, value=1)
    else:  # a nucleus in the middle (where the real params' ROI lands), darker than the rest
        z, y, x = np.indices(s0_shape, dtype=np.float32)
        r = [0.18 * n for n in s0_shape]
        inside = ((z - s0_shape[0] / 2) / r[0]) ** 2 + ((y - s0_shape[1] / 2) / r[1]) ** 2 + \
            ((x - s0_shape[2] / 2) / r[2]) ** 2 <= 1
        labels = inside.astype(np.uint8)
        em = em_like_volume(s0_shape, seed=5).astype(np.int16)
        image = (em * 37 - 4200 - 1500 * labels.astype(np.int16)).astype(np.int16)  # signed, like the real EM
    box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(missing, chunks))
    image[box] = 0  # all fill value: the service has no object for this chunk
    return downsampled(image, s0_shape), downsampled(labels, s0_shape)


def _write_array(folder: Path, data: np.ndarray, chunks: tuple[int, ...], separator: str) -> None:
    import tensorstore as ts

    meta = {"chunks": list(chunks), "compressor": {"id": "zstd", "level": 1}, "dimension_separator": separator,
            "dtype": data.dtype.str, "fill_value": 0, "filters": None, "order": "C", "shape": list(data.shape),
            "zarr_format": 2}
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder) + "/"}, "metadata": meta,
            "create": True, "delete_existing": True}
    array = ts.open(spec).result()
    array.write(data).result()
    (folder / ".zarray").write_text(json.dumps(meta, indent=4, sort_keys=True))  # the service's formatting


def build_container(root: Path, variant: str) -> dict[str, Any]:
    """Write the bucket's objects under ``root/<bucket>/``; the arrays they hold."""
    images, masks = pyramid(variant)
    chunks = VARIANTS[variant][1]
    base = root / BUCKET / CONTAINER
    groups = ["", "recon-2", "recon-2/em", IMAGE, "recon-2/labels", "recon-2/labels/inference",
              "recon-2/labels/inference/segmentations", NUCLEUS, MITO]
    for group in groups:
        (base / group).mkdir(parents=True, exist_ok=True)
        (base / group / ".zgroup").write_text(json.dumps({"zarr_format": 2}, indent=4))
    (base / IMAGE / ".zattrs").write_text(json.dumps(multiscales(""), indent=4, sort_keys=True))
    (base / NUCLEUS / ".zattrs").write_text(json.dumps(multiscales("nuc"), indent=4, sort_keys=True))
    (base / MITO / ".zattrs").write_text(json.dumps(multiscales("mito"), indent=4, sort_keys=True))
    mito = downsampled(mitochondria(VARIANTS[variant][0]), VARIANTS[variant][0])
    for level, image, mask, ids in zip(LEVELS, images, masks, mito):
        _write_array(base / IMAGE / level, image, chunks, "/")
        _write_array(base / NUCLEUS / level, mask, chunks, ".")
        _write_array(base / MITO / level, ids, chunks, "/")
    return {"images": dict(zip(LEVELS, images)), "labels": dict(zip(LEVELS, masks)),
            "mito": dict(zip(LEVELS, mito)), "root": root / BUCKET}


_UPLOADED: dict[str, str] = {}  # backend endpoint -> digest of the objects it holds


def upload(folder: Path, server: SeaweedS3) -> int:
    """Put every file under ``folder`` (a bucket's folder) into that bucket, unless it holds them already."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    if _UPLOADED.get(server.endpoint) == digest.hexdigest():
        return 0
    client = server.client()
    if folder.name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        try:
            client.create_bucket(Bucket=folder.name)
        except client.exceptions.BucketAlreadyOwnedByYou:  # SeaweedFS may list no buckets
            pass
    stale = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=folder.name):
        stale.update(item["Key"] for item in page.get("Contents", []))
    keys = [p.relative_to(folder).as_posix() for p in files]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kp: client.put_object(Bucket=folder.name, Key=kp[0], Body=kp[1].read_bytes()),
                      zip(keys, files)))
        list(pool.map(lambda k: client.delete_object(Bucket=folder.name, Key=k), sorted(stale - set(keys))))
    _UPLOADED[server.endpoint] = digest.hexdigest()
    return len(files)


@dataclass
class RunningOmeZarr:
    """One start of the replica: its front (log, faults) before the shared server, and the data."""

    server: S3Front
    variant: str
    data: dict[str, Any]

    def key_path(self, key: str) -> str:
        """The front's path of a container-relative key (``/<bucket>/<container>/<key>``)."""
        return f"/{BUCKET}/{CONTAINER}/{key}"

    def source(self, level: str, roi: dict[str, Any] | None, labels: bool = True) -> dict[str, Any]:
        return {"kind": "ome_zarr_s3", "endpoint": self.server.url, "region": REGION, "bucket": BUCKET,
                "container": CONTAINER, "image": IMAGE, "level": level, "roi": roi,
                "labels": {"nucleus": NUCLEUS} if labels else None}

    def dataset(self, key: str, level: str, roi: dict[str, Any] | None) -> dict[str, Any]:
        return {"title": f"OpenOrganelle jrc_mus-nacc-2 {level} (replica)", "modality": "FIB-SEM",
                "license": "CC-BY-4.0 (replica data)", "citation": "Heinrich et al., Nature 2021 (replica data)",
                "source": self.source(level, roi)}

    def box(self, level: str, roi: dict[str, Any] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        shape = self.data["images"][level].shape
        if roi is None:
            return (0, 0, 0), tuple(shape)
        return tuple(roi["start"]), tuple(a + n for a, n in zip(roi["start"], roi["shape"]))

    def chunk_keys(self, level: str, roi: dict[str, Any] | None) -> dict[str, list[str]]:
        """Container-relative keys of the chunk objects the region touches that exist, per array."""
        start, stop = self.box(level, roi)
        chunks = VARIANTS[self.variant][1]
        out = {}
        for name, group, sep in (("raw", IMAGE, "/"), ("labels/nucleus", NUCLEUS, ".")):
            keys = []
            for i in range(start[0] // chunks[0], (stop[0] - 1) // chunks[0] + 1):
                for j in range(start[1] // chunks[1], (stop[1] - 1) // chunks[1] + 1):
                    for k in range(start[2] // chunks[2], (stop[2] - 1) // chunks[2] + 1):
                        key = f"{group}/{level}/{sep.join(map(str, (i, j, k)))}"
                        if (self.data["root"] / CONTAINER / key).is_file():
                            keys.append(key)
            out[name] = keys
        return out

    def cases(self) -> list[ReplicaCase]:
        out = []
        local = CONTAINER.rsplit("/", 1)[-1]
        for key, (level, roi) in CASES.items():
            start, stop = self.box(level, roi)
            crop = tuple(slice(a, b) for a, b in zip(start, stop))
            expected = {"raw": self.data["images"][level][crop], "labels/nucleus": self.data["labels"][level][crop]}
            i = LEVELS.index(level)
            offset = tuple(t + a * s for t, a, s in zip(REAL_TRANSLATIONS[i], start, REAL_SCALES[i]))
            keys = [k for ks in self.chunk_keys(level, roi).values() for k in ks]
            biggest = max(keys, key=lambda k: (self.data["root"] / CONTAINER / k).stat().st_size)
            files = {f"{local}/{k}": self.key_path(k) for k in keys}
            out.append(ReplicaCase(key, self.dataset(key, level, roi), expected, REAL_SCALES[i],
                                   offset, fault_path=self.key_path(biggest), files=files))  # type: ignore[arg-type]
        return out

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """A real entry pointed at this replica; its ROI moved to the same relative place in the smaller data."""
        out = {**dataset, "source": dict(dataset["source"])}
        src = out["source"]
        if src.get("bucket") != BUCKET or src.get("container") != CONTAINER:
            raise EmdataError(f"demo: {key}: the OpenOrganelle replica serves s3://{BUCKET}/{CONTAINER} only")
        groups = {IMAGE, NUCLEUS, MITO}
        for group in [src.get("image"), *(src.get("labels") or {}).values()]:
            if group not in groups:
                raise EmdataError(f"demo: {key}: the OpenOrganelle replica has no group {group!r}")
        level = src.get("level")
        if level not in LEVELS:
            raise EmdataError(f"demo: {key}: the OpenOrganelle replica has no level {level!r}")
        src["endpoint"] = self.server.url
        i = LEVELS.index(level)
        mine = self.data["images"][level].shape
        for name, unit in (("roi", 1.0), ("roi_nm", None)):
            roi = src.get(name)
            if not roi:
                continue
            if unit is None:  # nm -> voxels of the real level, then the same fractions of the replica's
                start = [(a - t) / s for a, t, s in zip(roi["start"], REAL_TRANSLATIONS[i], REAL_SCALES[i])]
                size = [n / s for n, s in zip(roi["shape"], REAL_SCALES[i])]
            else:
                start, size = list(roi["start"]), list(roi["shape"])
            lo = [min(m - 1, max(0, math.floor(a * m / r))) for a, m, r in zip(start, mine, REAL_SHAPES[i])]
            n = [max(1, min(m - a, round(w * m / r))) for a, w, m, r in zip(lo, size, mine, REAL_SHAPES[i])]
            del src[name]
            src["roi"] = {"start": lo, "shape": n}
        return out


class _OmeZarrReplicaKind:
    kind = "ome_zarr_s3"
    transport = "s3"
    case_keys = tuple(CASES)

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True) -> Iterator[RunningOmeZarr]:
        """Coordinate-encoded small data for tests; a larger EM-like volume (nicer thumbnails) for the demo."""
        variant = "test" if coordinate else "demo"
        data = build_container(Path(root), variant)
        backend = shared_anonymous_s3(f"ome_zarr_s3-{variant}")
        upload(data["root"], backend)
        with S3Front(backend.endpoint) as front:
            yield RunningOmeZarr(front, variant, data)


REPLICA = _OmeZarrReplicaKind()
