"""Offline replica of a neuroglancer precomputed image layer on GCS (the FlyEM hemibrain EM).

The same URL path as the public bucket (``/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg/``
under the server root, in place of ``https://storage.googleapis.com``), served with Range support
by :class:`~emdata.testing.http_server.ReplicaServer`. The layer is written by tensorstore itself
into a folder and served as files, so its bytes are what a real precomputed writer produces:

- ``8.0x8.0x8.0``: JPEG, sharded (``neuroglancer_uint64_sharded_v1``, identity hash, gzip
  minishard indexes), 16^3 chunks, an odd, non-cubic size and a non-zero ``voxel_offset``;
- ``16.0x16.0x16.0``: JPEG, unsharded (``x0-x1_y0-y1_z0-z1`` chunk files);
- ``32.0x32.0x32.0``: raw, unsharded, 8^3 chunks (the default screening scale of the demo crop);
- ``64.0x64.0x64.0``: raw, sharded with the ``murmurhash3_x86_128`` hash.

The neuron segmentation (``/neuroglancer-janelia-flyem-hemibrain/v1.2/segmentation/``) is written
by tensorstore too, with the real layer's ``info`` (SOURCES.md §3.2) scaled down: uint64,
``compressed_segmentation`` with 8^3 blocks, sharded (identity hash, gzip minishard index and
data; preshift + minishard + shard bits = the Morton bits of its small grid), voxel offset 0 and a
size that differs from the EM's (shorter in y, longer in z and x, as the real layers differ), plus
an unsharded 16 nm scale. Its ids are a Voronoi partition of the tissue into "neurons" with
realistic large body ids (one above 2^53, so a float anywhere would show), 0 outside the tissue.

The tissue is an ellipsoid in physical coordinates surrounded by zeros, so a naive random crop is
often empty; all-zero chunks are not written (missing chunks read as 0, as on the real bucket).
Inside the tissue voxels are coordinate-encoded (tests) or EM-like (demo), never 0.

JPEG is lossy: a case's expected voxels are what tensorstore decodes from the replica's own
files (read from the folder, not over HTTP), and the raw-encoded case compares with the
generated array itself, exactly.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from emdata.errors import EmdataError
from emdata.testing.http_server import ReplicaServer
from emdata.testing.registry import ReplicaCase
from emdata.testing.volumes import coordinate_volume, em_like_volume
from emdata.formats.precomputed import parse_info

LAYER_PATH = "/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg"
REAL_HOST = "https://storage.googleapis.com"
FINE_SIZE = (93, 118, 141)  # z, y, x voxels at 8 nm
FINE_OFFSET = (8, 16, 24)
DEMO_CROP = (36, 44, 52)  # what the real 1000^3 crop becomes in the demo
SHARDED_IDENTITY = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": 3,
                    "minishard_bits": 2, "shard_bits": 5, "minishard_index_encoding": "gzip", "data_encoding": "raw"}
SHARDED_MURMUR = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "murmurhash3_x86_128", "preshift_bits": 1,
                  "minishard_bits": 1, "shard_bits": 2, "minishard_index_encoding": "gzip", "data_encoding": "gzip"}
# (factor, chunk, encoding, sharding) per scale
SCALES = [(1, 16, "jpeg", SHARDED_IDENTITY), (2, 16, "jpeg", None), (4, 8, "raw", None), (8, 8, "raw", SHARDED_MURMUR)]
SEGMENTATION_PATH = "/neuroglancer-janelia-flyem-hemibrain/v1.2/segmentation"
SEGMENTATION_LAYER = "v1.2/segmentation"  # as params.yaml names it: under the bucket of the EM url
SEGMENTATION_SIZE = (FINE_OFFSET[0] + FINE_SIZE[0] + 3, FINE_OFFSET[1] + FINE_SIZE[1] - 6,
                     FINE_OFFSET[2] + FINE_SIZE[2] + 5)  # z, y, x at 8 nm, voxel offset 0
# A 16^3 chunk grid of 7 x 8 x 11 (z, y, x): 3 + 3 + 4 = 10 Morton bits = preshift + minishard + shard.
SEGMENTATION_SHARDING = {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": 3,
                         "minishard_bits": 2, "shard_bits": 5, "minishard_index_encoding": "gzip",
                         "data_encoding": "gzip"}
NEURON_IDS = (1_003_465_123, 5_813_020_828, 2**40 + 17, 2**53 + 1, 424_789_697, 1_196_854_070, 7_112_622_044,
              2**62 + 5, 5_901_222_910, 612_738_462, 1_509_381_221, 2_038_617_468)


def tissue_mask(shape: tuple[int, ...], offset: tuple[int, ...], factor: int) -> np.ndarray:
    """Voxels whose centre lies in the tissue ellipsoid (physical coordinates, shared by every scale)."""
    fine_lo = np.array(FINE_OFFSET, float)
    fine_hi = fine_lo + np.array(FINE_SIZE, float)
    centre = fine_lo + (fine_hi - fine_lo) * np.array([0.5, 0.5, 0.64])  # off-centre: one side is all background
    radii = np.array(FINE_SIZE, float) * np.array([0.42, 0.40, 0.30])
    axes = [((np.arange(n) + o + 0.5) * factor - c) / r for n, o, c, r in zip(shape, offset, centre, radii)]
    z, y, x = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    return (z**2 + y**2 + x**2) <= 1.0


def neuron_ids(shape: tuple[int, ...], seed: int = 23) -> np.ndarray:
    """uint64 body ids: each voxel of the fine grid (voxel offset 0) takes the id of the nearest of a few
    random centres (a Voronoi partition), 0 outside the tissue ellipsoid."""
    rng = np.random.default_rng(seed)
    size = np.array(FINE_SIZE, float)
    middle = np.array(FINE_OFFSET, float) + size * np.array([0.5, 0.5, 0.64])  # the tissue's centre and radii
    centres = middle + size * np.array([0.42, 0.40, 0.30]) * rng.uniform(-0.6, 0.6, (len(NEURON_IDS), 3))
    ids = np.array(NEURON_IDS, np.uint64)
    yy, xx = np.meshgrid(np.arange(shape[1]) + 0.5, np.arange(shape[2]) + 0.5, indexing="ij")
    out = np.zeros(shape, np.uint64)
    for z in range(shape[0]):  # a plane at a time: the distances of every voxel to every centre stay small
        d = ((z + 0.5 - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2
             + (xx - centres[:, 2, None, None]) ** 2)
        out[z] = ids[np.argmin(d, axis=0)]
    return np.where(tissue_mask(shape, (0, 0, 0), 1), out, np.uint64(0))


@dataclass
class PrecomputedReplica:
    root: Path
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # scale key -> generated voxels (ZYX)
    offsets: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # scale key -> voxel_offset (ZYX)
    info: dict[str, Any] = field(default_factory=dict)
    segmentation: np.ndarray | None = None  # the generated body ids at 8 nm (ZYX, voxel offset 0)
    segmentation_info: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.root / LAYER_PATH.lstrip("/")

    @property
    def segmentation_folder(self) -> Path:
        return self.root / SEGMENTATION_PATH.lstrip("/")

    def decoded(self, key: str, start: tuple[int, ...], stop: tuple[int, ...], *,
                segmentation: bool = False) -> np.ndarray:
        """What tensorstore decodes from the replica's own files for a box (absolute ZYX voxels)."""
        import tensorstore as ts

        info, folder = (self.segmentation_info, self.segmentation_folder) if segmentation else (self.info, self.folder)
        index = [s["key"] for s in info["scales"]].index(key)
        store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": index,
                         "kvstore": {"driver": "file", "path": str(folder) + "/"}}, read=True).result()
        view = store[ts.d["channel"][0]][ts.d["z", "y", "x"].transpose[0, 1, 2]]
        return np.ascontiguousarray(view[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].read().result())

    def chunk_paths(self, key: str) -> list[Path]:
        return sorted(p for p in (self.folder / key).iterdir() if p.is_file())


def build_precomputed_replica(root: Path, *, coordinate: bool = True) -> PrecomputedReplica:
    """Write the layer under ``root`` with tensorstore (info, then every scale)."""
    import tensorstore as ts

    replica = PrecomputedReplica(Path(root))
    replica.folder.mkdir(parents=True, exist_ok=True)
    scales = []
    for factor, chunk, encoding, sharding in SCALES:
        size = tuple(-(-n // factor) for n in FINE_SIZE)
        offset = tuple(o // factor for o in FINE_OFFSET)
        key = f"{8.0 * factor}x{8.0 * factor}x{8.0 * factor}"
        entry: dict[str, Any] = {"key": key, "resolution": [8.0 * factor] * 3, "size": list(size[::-1]),
                                 "voxel_offset": list(offset[::-1]), "chunk_sizes": [[chunk] * 3],
                                 "encoding": encoding}
        if sharding:
            entry["sharding"] = sharding
        scales.append(entry)
        mask = tissue_mask(size, offset, factor)
        content = coordinate_volume(size) if coordinate else em_like_volume(size, seed=factor)
        floor = 1 if coordinate else 40
        replica.arrays[key] = np.where(mask, np.maximum(content, floor), 0).astype(np.uint8)
        replica.offsets[key] = offset  # type: ignore[assignment]
    replica.info = {"@type": "neuroglancer_multiscale_volume", "type": "image", "data_type": "uint8",
                    "num_channels": 1, "scales": scales}
    (replica.folder / "info").write_text(json.dumps(replica.info, indent=1))
    for index, entry in enumerate(scales):
        store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": index,
                         "kvstore": {"driver": "file", "path": str(replica.folder) + "/"}}, open=True).result()
        store[...] = replica.arrays[entry["key"]].transpose(2, 1, 0)[..., None]  # layer order: x, y, z, c
    write_segmentation(replica)
    return replica


def write_segmentation(replica: PrecomputedReplica) -> None:
    """The neuron segmentation layer: info as the real one (scaled down), then each scale, by tensorstore."""
    import tensorstore as ts

    fine = neuron_ids(SEGMENTATION_SIZE)
    replica.segmentation = fine
    levels = [(fine, SEGMENTATION_SHARDING), (fine[::2, ::2, ::2], None)]  # 8 nm sharded, 16 nm unsharded
    scales = []
    for factor, (array, sharding) in zip((1, 2), levels):
        res = 8.0 * factor
        entry: dict[str, Any] = {"key": f"{res}x{res}x{res}", "resolution": [res] * 3, "size": list(array.shape[::-1]),
                                 "voxel_offset": [0, 0, 0], "chunk_sizes": [[16, 16, 16]],
                                 "encoding": "compressed_segmentation", "compressed_segmentation_block_size": [8, 8, 8]}
        if sharding:
            entry["sharding"] = sharding
        scales.append(entry)
    replica.segmentation_info = {"@type": "neuroglancer_multiscale_volume", "type": "segmentation",
                                 "data_type": "uint64", "num_channels": 1, "scales": scales}
    folder = replica.segmentation_folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "info").write_text(json.dumps(replica.segmentation_info, indent=1))
    for index, (array, _) in enumerate(levels):
        store = ts.open({"driver": "neuroglancer_precomputed", "scale_index": index,
                         "kvstore": {"driver": "file", "path": str(folder) + "/"}}, open=True).result()
        store[...] = np.ascontiguousarray(array.transpose(2, 1, 0))[..., None]


def precomputed_dataset(layer_url: str, *, scale: Any = 8, crop: tuple[int, int, int] = DEMO_CROP,
                        seed: int | None = 3, roi_start: tuple[int, int, int] | None = None,
                        block: tuple[int, int, int] | None = None, labels: dict[str, str] | None = None,
                        **tissue: Any) -> dict[str, Any]:
    """A ``datasets`` entry of params.yaml for the replica's layer (``labels``: name -> layer path or URL)."""
    source: dict[str, Any] = {"kind": "precomputed", "url": layer_url, "scale": scale, "crop_size": list(crop)}
    if seed is not None:
        source["seed"] = seed
    if roi_start is not None:
        source["roi_start"] = list(roi_start)
    if block is not None:
        source["block"] = list(block)
    if tissue:
        source["tissue"] = dict(tissue)
    if labels:
        source["labels"] = {name: {"layer": layer} for name, layer in labels.items()}
    return {"title": "FlyEM hemibrain EM crop (replica)", "modality": "FIB-SEM", "license": "CC-BY 4.0 (replica)",
            "citation": "Scheffer et al., eLife 2020 (replica data)", "source": source}


@dataclass
class RunningPrecomputed:
    replica: PrecomputedReplica
    server: ReplicaServer

    @property
    def layer_url(self) -> str:
        return self.server.url + LAYER_PATH

    def cases(self) -> list[ReplicaCase]:
        out = []
        # JPEG, sharded, an explicit ROI that is not chunk-aligned, blocks smaller than the crop; with the
        # neuron labels of the same box (compressed_segmentation, sharded), as tensorstore reads them.
        key = "8.0x8.0x8.0"
        start, crop = (FINE_OFFSET[0] + 25, FINE_OFFSET[1] + 31, FINE_OFFSET[2] + 37), (29, 37, 45)
        stop = tuple(a + c for a, c in zip(start, crop))
        dataset = precomputed_dataset(self.layer_url, scale=8, crop=crop, seed=None, roi_start=start,
                                      block=(16, 16, 32), labels={"neurons": SEGMENTATION_LAYER})
        expected = {"raw": self.replica.decoded(key, start, stop),
                    "labels/neurons": self.replica.decoded(key, start, stop, segmentation=True)}
        out.append(ReplicaCase("hemibrain_em_crop", dataset, expected,
                               (8.0, 8.0, 8.0), tuple(8.0 * a for a in start),  # type: ignore[arg-type]
                               fault_path=self._fault_object(key, start, stop, (16, 16, 32))))
        # raw encoding, unsharded: compared with the generated voxels themselves.
        key = "32.0x32.0x32.0"
        off = self.replica.offsets[key]
        start, crop = (off[0] + 5, off[1] + 6, off[2] + 7), (11, 13, 17)
        stop = tuple(a + c for a, c in zip(start, crop))
        array = self.replica.arrays[key]
        local = tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, off))
        dataset = precomputed_dataset(self.layer_url, scale=[32, 32, 32], crop=crop, seed=None, roi_start=start,
                                      block=(8, 8, 8))
        out.append(ReplicaCase("hemibrain_em_crop_raw", dataset, {"raw": array[local].copy()}, (32.0, 32.0, 32.0),
                               tuple(32.0 * a for a in start),  # type: ignore[arg-type]
                               fault_path=self._fault_object(key, start, stop, (8, 8, 8))))
        return out

    def _fault_object(self, key: str, start: tuple[int, ...], stop: tuple[int, ...], block: tuple[int, ...]) -> str:
        """URL path of a chunk or shard file that the crop's last block reads and its first block does not.

        Faults injected there fail some blocks while others complete, so resuming can be observed.
        """

        layer = parse_info(self.replica.info, "replica", self.layer_url)
        scale = next(s for s in layer.scales if s.key == key)
        last = tuple(a + ((b - a - 1) // k) * k for a, b, k in zip(start, stop, block))
        first_stop = tuple(min(a + k, b) for a, b, k in zip(start, stop, block))

        def objects(lo: tuple[int, ...], hi: tuple[int, ...]) -> set[str]:
            chunks = scale.chunks_in(lo, hi)  # type: ignore[arg-type]
            names = {scale.shard_of(c) if scale.sharding else scale.chunk_name(c) for c in chunks}
            return {n for n in names if (self.replica.folder / key / n).is_file()}

        candidates = objects(last, stop) - objects(start, first_stop)
        name = max(sorted(candidates), key=lambda n: (self.replica.folder / key / n).stat().st_size)
        return f"{LAYER_PATH}/{key}/{name}"

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """Point a real entry at the replica: same path on the loopback server, a crop that fits it."""
        out = {**dataset, "source": dict(dataset["source"])}
        src = out["source"]
        url = str(src["url"])
        for prefix in ("precomputed://",):
            url = url[len(prefix):] if url.startswith(prefix) else url
        if url.startswith("gs://"):
            url = REAL_HOST + "/" + url[len("gs://"):]
        path = urllib.parse.urlsplit(url).path.rstrip("/")
        if path != LAYER_PATH:
            raise EmdataError(f"demo: {key}: the precomputed replica serves {LAYER_PATH}, not {path!r}")
        src["url"] = self.server.url + path
        for spec in (src.get("labels") or {}).values():  # a label layer's full URL: the same path here
            layer = str(spec["layer"])
            if layer.startswith(("gs://", "http://", "https://", "precomputed://")):
                layer = layer.split("precomputed://", 1)[-1].replace("gs://", REAL_HOST + "/", 1)
                spec["layer"] = self.server.url + urllib.parse.urlsplit(layer).path
        src["crop_size"] = [min(int(c), d) for c, d in zip(src["crop_size"], DEMO_CROP)]
        if src.get("roi_start") is not None:  # a real ROI lies outside the small replica: search instead
            src.pop("roi_start")
            src.setdefault("seed", 0)
        return out


class _PrecomputedReplicaKind:
    kind = "precomputed"
    transport = "http-array"
    case_keys = ("hemibrain_em_crop", "hemibrain_em_crop_raw")

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True) -> Iterator[RunningPrecomputed]:
        replica = build_precomputed_replica(Path(root), coordinate=coordinate)
        with ReplicaServer(replica.root) as server:
            yield RunningPrecomputed(replica, server)


REPLICA = _PrecomputedReplicaKind()


def coarse_fraction(replica: PrecomputedReplica, key: str, start: tuple[int, ...], stop: tuple[int, ...],
                    fine_resolution: float, coarse_resolution: float) -> float:
    """Non-zero share of the generated coarse voxels covering a fine box (an independent check of the search)."""
    off = replica.offsets[key]
    array = replica.arrays[key]
    lo = [math.floor(a * fine_resolution / coarse_resolution) for a in start]
    hi = [math.ceil(b * fine_resolution / coarse_resolution) for b in stop]
    box = array[tuple(slice(max(a - o, 0), max(b - o, 0)) for a, b, o in zip(lo, hi, off))]
    return float(np.count_nonzero(box)) / box.size if box.size else 0.0
