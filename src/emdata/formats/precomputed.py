"""Neuroglancer precomputed image layers (through tensorstore) and the local store of a crop.

- :func:`parse_info` checks a layer's ``info`` and turns each scale into a :class:`Scale` in
  Z, Y, X order: the layer's X, Y, Z (, C) order is converted once, here, and nowhere else.
- :func:`open_scale` opens one scale with tensorstore's ``neuroglancer_precomputed`` driver over
  its HTTP key-value store (sharded or not, any encoding tensorstore decodes: raw, jpeg, ...) as a
  Z, Y, X view in the scale's absolute voxel coordinates; :func:`read` reads a box of it with a
  time limit and turns tensorstore's errors into one-line :class:`~emdata.errors.SourceError`\\ s.
- Chunk and shard arithmetic for ``plan`` (:meth:`Scale.chunks_in`, :meth:`Scale.shard_of`):
  unsharded chunk names ``x0-x1_y0-y1_z0-z1``, sharded ``<hex>.shard`` from the compressed Morton
  code and the sharding hash (neuroglancer ``sharded.md``).
- :class:`CropStore` creates the local zarr v2 array of a decoded crop, one uncompressed chunk
  file per block (the shared object copy writes each block once, atomically, and a fetch resumes
  block by block), and :class:`CropVolume` is the lazy Z, Y, X
  :class:`~emdata.formats.raw.RawVolume` normalize reads from it.

Missing chunks of a precomputed layer are the fill value 0, as neuroglancer shows them.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emdata.core.boxes import Box, Grid
from emdata.errors import FetchError, FormatError, IntegrityError, SourceError, refetch_hint
from emdata.formats.raw import IntTriple, RawVolume, Triple

STORE = "crop.zarr"  # the local store, relative to the raw folder
DATA_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32")
SHARDING = "neuroglancer_uint64_sharded_v1"


def tensorstore(dataset: str) -> Any:
    """The tensorstore module, or one line saying how to install it."""
    try:
        import tensorstore as ts
    except ImportError as exc:
        raise FormatError(dataset, "tensorstore", "tensorstore is not installed (it reads precomputed layers)",
                          'pip install "emdata[precomputed]"') from exc
    return ts


def http_requests_started() -> int:
    """HTTP requests tensorstore has started in this process so far (its own metric: no hook sees
    them, since tensorstore's HTTP client is not ours). The difference over a fetch is its count."""
    try:
        import tensorstore as ts
    except ImportError:
        return 0
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/http/request_started"):
        return int(sum(v.get("value", 0) for v in metric.get("values", [])))
    return 0


def xyz_to_zyx(values: Any) -> tuple:
    """The one place where the layer's X, Y, Z order becomes Z, Y, X."""
    x, y, z = values
    return (z, y, x)


@dataclass(frozen=True)
class Scale:
    """One entry of ``scales`` in Z, Y, X order (voxels of this scale; resolution in nm)."""

    index: int
    key: str
    resolution: Triple
    size: IntTriple
    voxel_offset: IntTriple
    chunk: IntTriple
    encoding: str
    sharding: dict[str, Any] | None

    @property
    def stop(self) -> IntTriple:
        return tuple(o + s for o, s in zip(self.voxel_offset, self.size))  # type: ignore[return-value]

    @property
    def grid(self) -> IntTriple:
        """Chunks per axis (Z, Y, X)."""
        return tuple(-(-s // c) for s, c in zip(self.size, self.chunk))  # type: ignore[return-value]

    def label(self) -> str:
        res = " x ".join(f"{r:g}" for r in self.resolution)
        return f"{self.key} ({res} nm, {self.encoding}{', sharded' if self.sharding else ''})"

    def chunks_in(self, start: IntTriple, stop: IntTriple) -> list[IntTriple]:
        """Grid positions (Z, Y, X) of the chunks a box ``[start, stop)`` (absolute voxels) touches."""
        origin = tuple(-o for o in self.voxel_offset)  # the chunk grid starts at the voxel offset
        return Grid(self.size, self.chunk).touched(Box(start, stop).shifted(origin))  # type: ignore[arg-type]

    def chunk_name(self, pos: IntTriple) -> str:
        """The unsharded object name of a chunk: ``x0-x1_y0-y1_z0-z1`` (ends clipped to the scale)."""
        z, y, x = (self._extent(axis, p) for axis, p in enumerate(pos))
        return f"{x[0]}-{x[1]}_{y[0]}-{y[1]}_{z[0]}-{z[1]}"

    def _extent(self, axis: int, p: int) -> tuple[int, int]:
        lo = self.voxel_offset[axis] + p * self.chunk[axis]
        return lo, min(lo + self.chunk[axis], self.stop[axis])

    def shard_of(self, pos: IntTriple) -> str:
        """The shard file holding a chunk (``sharded.md``: compressed Morton code, preshift, hash)."""
        assert self.sharding is not None
        sh = self.sharding
        chunk_id = compressed_morton(xyz_to_zyx(pos), xyz_to_zyx(self.grid))  # Morton order is x, y, z
        hashed = shard_hash(chunk_id >> int(sh["preshift_bits"]), str(sh["hash"]))
        shard = (hashed >> int(sh["minishard_bits"])) & ((1 << int(sh["shard_bits"])) - 1)
        digits = -(-int(sh["shard_bits"]) // 4)
        return f"{shard:0{digits}x}.shard"


def compressed_morton(pos: tuple[int, ...], grid: tuple[int, ...]) -> int:
    """Bits of ``pos`` interleaved in axis order; an axis stops once ``2**i >= grid[axis]``."""
    bits = [max(0, int(n - 1).bit_length()) for n in grid]
    out, j = 0, 0
    for i in range(max(bits, default=0)):
        for axis, p in enumerate(pos):
            if i < bits[axis]:
                out |= ((p >> i) & 1) << j
                j += 1
    return out


def shard_hash(value: int, name: str) -> int:
    if name == "identity":
        return value
    if name == "murmurhash3_x86_128":
        import mmh3  # the precomputed extra

        low, _high = mmh3.hash64(struct.pack("<Q", value), 0, False, False)
        return int(low)
    raise ValueError(f"unknown sharding hash {name!r}")


@dataclass(frozen=True)
class Layer:
    url: str  # the layer folder, no trailing slash
    info: dict[str, Any]
    data_type: str
    num_channels: int
    scales: tuple[Scale, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data_type)


def parse_info(info: Any, dataset: str, url: str) -> Layer:
    """A layer's ``info``, checked; every problem is one FormatError naming the URL and the key."""
    where = f"{url}/info"

    def bad(problem: str) -> FormatError:
        return FormatError(dataset, where, f"malformed precomputed info: {problem}",
                           "check that source.url is a neuroglancer precomputed layer (the folder holding `info`)")

    if not isinstance(info, dict):
        raise bad(f"expected a JSON object, got {type(info).__name__}")
    kind = info.get("type")
    if kind not in ("image", "segmentation"):
        raise bad(f"type {kind!r} is not a volume layer (expected 'image' or 'segmentation')")
    data_type = info.get("data_type")
    if data_type not in DATA_TYPES:
        raise bad(f"data_type {data_type!r} is not one of {', '.join(DATA_TYPES)}")
    channels = info.get("num_channels")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise bad(f"num_channels {channels!r} is not a positive integer")
    if channels != 1:
        raise FormatError(dataset, where, f"the layer has {channels} channels; emdata stores single-channel volumes",
                          "choose a single-channel layer")
    scales = info.get("scales")
    if not isinstance(scales, list) or not scales:
        raise bad("scales is missing or empty")
    out = []
    for i, sc in enumerate(scales):
        if not isinstance(sc, dict):
            raise bad(f"scales[{i}] is not an object")
        key = sc.get("key")
        if not isinstance(key, str) or not key or key.startswith("/") or ".." in key.split("/"):
            raise bad(f"scales[{i}].key {key!r} is not a relative name")
        res, size, offset = sc.get("resolution"), sc.get("size"), sc.get("voxel_offset", [0, 0, 0])
        if not isinstance(res, list) or not _triple(res, float) or not all(r > 0 and math.isfinite(r) for r in res):
            raise bad(f"scales[{i}].resolution {res!r} is not three positive numbers")
        if not isinstance(size, list) or not _triple(size, int) or not all(s > 0 for s in size):
            raise bad(f"scales[{i}].size {size!r} is not three positive integers")
        if not _triple(offset, int):
            raise bad(f"scales[{i}].voxel_offset {offset!r} is not three integers")
        chunks = sc.get("chunk_sizes")
        if not isinstance(chunks, list) or not chunks or not _triple(chunks[0], int) or min(chunks[0]) < 1:
            raise bad(f"scales[{i}].chunk_sizes {chunks!r} is not a list of three positive integers")
        encoding = sc.get("encoding")
        if not isinstance(encoding, str) or not encoding:
            raise bad(f"scales[{i}].encoding {encoding!r} is missing")
        sharding = sc.get("sharding")
        if sharding is not None:
            need = ("preshift_bits", "minishard_bits", "shard_bits")
            if (not isinstance(sharding, dict) or sharding.get("@type") != SHARDING
                    or not all(_is_int(sharding.get(k)) and sharding[k] >= 0 for k in need)
                    or sharding.get("hash") not in ("identity", "murmurhash3_x86_128")):
                raise bad(f"scales[{i}].sharding {sharding!r} is not a {SHARDING} specification")
        out.append(Scale(i, key, tuple(float(r) for r in xyz_to_zyx(res)), xyz_to_zyx(size),  # type: ignore[arg-type]
                         xyz_to_zyx(offset), xyz_to_zyx(chunks[0]), encoding, sharding))
    return Layer(url, info, data_type, channels, tuple(out))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _triple(value: Any, kind: type) -> bool:
    if not isinstance(value, list) or len(value) != 3:
        return False
    if kind is int:
        return all(_is_int(v) for v in value)
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


# -- reading a remote scale ---------------------------------------------------------------------


def open_scale(layer: Layer, scale: Scale, context: dict[str, Any], dataset: str, timeout: float) -> Any:
    """A tensorstore of one scale as a Z, Y, X view (channel 0), in absolute voxel coordinates."""
    ts = tensorstore(dataset)

    spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "http", "base_url": layer.url + "/"},
            "scale_index": scale.index, "context": context}
    try:
        store = ts.open(spec, read=True).result(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - tensorstore raises ValueError/TimeoutError with a status text
        raise source_error(exc, dataset, f"{layer.url}/info", timeout) from exc
    return store[ts.d["channel"][0]][ts.d["z", "y", "x"].transpose[0, 1, 2]]


def read(store: Any, start: IntTriple, stop: IntTriple, dataset: str, url: str, timeout: float) -> np.ndarray:
    """Voxels ``[start, stop)`` (absolute Z, Y, X) of an opened scale, C-contiguous."""
    box = store[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    try:
        data = box.read().result(timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        raise source_error(exc, dataset, url, timeout) from exc
    return np.ascontiguousarray(data)


_URL = re.compile(r"https?://[^\s\"'\]\[]+")


def source_error(exc: BaseException, dataset: str, url: str, timeout: float) -> SourceError:
    """tensorstore's error as one line naming the dataset and the object that failed."""
    if isinstance(exc, (TimeoutError, concurrent.futures.TimeoutError)):  # the same class from Python 3.11
        return FetchError(dataset, url, f"no answer within {timeout:g} s",
                          "check the network or the server, then run the same command again to resume")
    text = " ".join(str(exc).split(" [tensorstore_spec=", 1)[0].split(" [source locations=", 1)[0].split())
    status = text.split(":", 1)[0].strip()
    urls = [m.group(0).rstrip(":.,;") for m in _URL.finditer(text)]
    where = urls[-1] if urls else url
    rest = text.rsplit(f"{where}: ", 1)[1] if f"{where}: " in text else text.split(": ", 1)[-1]
    rest = re.sub(r"\s*\[(http_response_body|curl_code)=('[^']*'|[^\]]*)\]", "", rest)
    rest = re.sub(r"\[HTTP code (\d+)\]", r"(HTTP \1)", rest)
    tries = re.match(r"All (\d+) retry attempts failed: (.*)", rest)
    if tries:
        rest = f"failed after {tries.group(1)} attempts: {tries.group(2)}"
    detail = rest if len(rest) <= 200 else rest[:197] + "..."
    if status in ("DATA_LOSS", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE"):
        return IntegrityError(dataset, where, f"the data could not be decoded ({detail})",
                              "the server sent damaged or truncated data; run the same command again, and report it "
                              "if it persists")
    return FetchError(dataset, where, detail, "check the network or the server, then run the same command again "
                      "to resume")


# -- the local store of a crop ------------------------------------------------------------------


def local_spec(folder: Path, *, create: bool = False, shape: IntTriple | None = None,
               block: IntTriple | None = None, dtype: np.dtype | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder) + "/"},
                            "context": {"cache_pool": {"total_bytes_limit": 0}}}
    if create:
        assert shape is not None and block is not None and dtype is not None
        spec["metadata"] = {"shape": list(shape), "chunks": list(block), "dtype": np.dtype(dtype).newbyteorder("<").str,
                            "compressor": None, "fill_value": 0, "order": "C", "dimension_separator": ".",
                            "filters": None}
        spec.update(open=True, create=True, store_data_equal_to_fill_value=True)
    return spec


class CropStore:
    """The local zarr v2 store of a crop, created empty: its ``.zarray`` (uncompressed chunks, Z, Y, X).

    Uncompressed, so the files are a function of the voxel values alone (the raw folder, its
    checksums and the HDF5 provenance do not change with the zstd version); EM hardly compresses.
    Its chunk files are written by the shared object copy (:mod:`emdata.sources.fetch.objects`),
    each atomically through :mod:`emdata.core.atomic`, not by tensorstore.
    """

    def __init__(self, folder: Path, shape: IntTriple, block: IntTriple, dtype: np.dtype, dataset: str) -> None:
        ts = tensorstore(dataset)
        self.folder = folder
        self.dtype = np.dtype(dtype)
        ts.open(local_spec(folder, create=True, shape=shape, block=block, dtype=dtype)).result()  # writes .zarray


class CropVolume(RawVolume):
    """The fetched crop (``crop.zarr`` in the raw folder) as a lazy Z, Y, X volume."""

    def __init__(self, folder: Path, dataset: str, *, voxel_size_nm: Triple, offset_nm: Triple) -> None:
        ts = tensorstore(dataset)

        self.path = folder
        self.dataset = dataset
        try:
            meta = json.loads((folder / ".zarray").read_text())
            self.array = ts.open(local_spec(folder), read=True).result()
        except (OSError, ValueError) as exc:
            raise FormatError(dataset, str(folder), f"the fetched crop cannot be opened ({_first_line(exc)})",
                              refetch_hint(dataset)) from exc
        self.shape = tuple(int(n) for n in self.array.shape)  # type: ignore[assignment]
        self.dtype = np.dtype(meta["dtype"])
        self.voxel_size_nm = voxel_size_nm
        self.offset_nm = offset_nm

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        try:
            data = self.array[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].read().result()
        except ValueError as exc:
            raise FormatError(self.dataset, str(self.path), f"a block cannot be read ({_first_line(exc)})",
                              refetch_hint(self.dataset)) from exc
        return np.ascontiguousarray(data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).split(" [tensorstore_spec=", 1)[0]
    return " ".join(text.split())[:200]

