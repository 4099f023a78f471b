"""A crop of a volume too large to copy: where it lies (given, or drawn at random inside tissue) and its blocks.

Where: with ``roi_start`` in params the crop starts there and must lie inside the scale.
Otherwise a seeded generator draws starts on the scale's chunk grid that keep the crop inside
it (on the grid, so no chunk is read twice) and screens each candidate on a coarser scale: it is
accepted when at least ``tissue.min_fraction`` of the coarse voxels it covers are non-zero,
after at most ``tissue.max_tries`` candidates. With ``inside`` (the bounds of other layers read
for the same box, such as labels) a candidate leaving it is rejected without a read; the draws
are the same, so adding a layer keeps the crop when it already lay inside. The same params give
the same crop; every candidate and its fraction are kept for the record. A scale is anything with a key, a
resolution (nm), a voxel offset, a size and a chunk, Z, Y, X (a neuroglancer precomputed scale is
one); reading the coarse voxels is the source's.

Blocks: the crop is copied block by block (:func:`copy_crop`: each :class:`CropBlock` is an
object of the shared copy in :mod:`emdata.sources.fetch.objects`, resumed only for the same
crop) into ``crop.zarr``, an uncompressed zarr v2 array with one chunk file per block
(:func:`chunk_bytes`), so a file is a function of the voxel values alone, and each further
:class:`CropLayer` (labels) into its own store of the same shape and blocks, in the same one
journalled copy. Memory holds a few blocks, never the crop.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np

from emdata.core.boxes import Box, Grid, IntTriple
from emdata.core.digest import sha256_file
from emdata.errors import ConfigError
from emdata.formats.precomputed import STORE, CropStore
from emdata.formats.precomputed import Scale as LayerScale
from emdata.formats.precomputed_labels import contains
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.objects import copy_objects, journalled
from emdata.sources.fetch.record import FetchedFile

HEAD_SAMPLE = 16  # chunks probed to estimate the bytes of an unsharded scale

log = logging.getLogger(__name__)

MIN_SPAN = 8  # the default screening scale still spans this many voxels of the crop per axis
MAX_SCREEN_VOXELS = 1 << 26  # one candidate's screening box


class Scale(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def key(self) -> str: ...

    @property
    def resolution(self) -> tuple[float, float, float]: ...

    @property
    def voxel_offset(self) -> IntTriple: ...

    @property
    def size(self) -> IntTriple: ...

    @property
    def chunk(self) -> IntTriple: ...

    @property
    def stop(self) -> IntTriple: ...


class Tissue(Protocol):
    @property
    def min_fraction(self) -> float: ...

    @property
    def max_tries(self) -> int: ...


class Wanted(Protocol):
    """The crop keys of a source's params (``path`` is where they live, for messages)."""

    @property
    def crop_size(self) -> IntTriple: ...

    @property
    def roi_start(self) -> IntTriple | None: ...

    @property
    def seed(self) -> int | None: ...

    @property
    def tissue(self) -> Tissue: ...

    @property
    def path(self) -> str: ...


S = TypeVar("S", bound=Scale)
Screen = Callable[[], tuple[S, Callable[[Box], np.ndarray]]]  # the screening scale and a reader of its boxes


@dataclass
class Crop:
    start: IntTriple  # absolute voxels of the scale, Z, Y, X
    stop: IntTriple
    chosen_by: str  # "roi_start" or "search"
    search: dict[str, Any] | None = None

    def how_chosen(self) -> str:
        if self.search is None:
            return "roi_start from params"
        return (f"seed {self.search['seed']}, {tries(self.search['tries'])}, {100 * self.search['fraction']:.1f}% "
                f"non-zero at {self.search['screening_scale']}")


def tries(n: int) -> str:
    return f"{n} try" if n == 1 else f"{n} tries"


def screening_scale(scales: Sequence[S], scale: S, size: IntTriple) -> S:
    """The coarsest scale at least as coarse as ``scale`` on which the crop still spans MIN_SPAN voxels per axis."""
    extent = [c * r for c, r in zip(size, scale.resolution)]
    coarser = [s for s in scales
               if all(rc >= r * 0.99 for rc, r in zip(s.resolution, scale.resolution))
               and all(e / rc >= MIN_SPAN for e, rc in zip(extent, s.resolution))]
    return max(coarser, key=lambda s: (math.prod(s.resolution), -s.index), default=scale)


def coarse_box(box: Box, scale: Scale, screen: Scale) -> Box:
    """The voxels of ``screen`` that cover ``box`` of ``scale`` (clipped to ``screen``)."""
    lo = [math.floor(a * r / rc + 1e-9) for a, r, rc in zip(box.start, scale.resolution, screen.resolution)]
    hi = [math.ceil(b * r / rc - 1e-9) for b, r, rc in zip(box.stop, scale.resolution, screen.resolution)]
    lo = [min(max(v, o), e) for v, o, e in zip(lo, screen.voxel_offset, screen.stop)]
    hi = [min(max(v, a), e) for v, a, e in zip(hi, lo, screen.stop)]
    return Box(tuple(lo), tuple(hi))  # type: ignore[arg-type]


def choose_crop(wanted: Wanted, scale: S, layer: str, screen: Screen[S], dataset: str, *,
                inside: Box | None = None) -> Crop:
    """The crop ``wanted`` asks for in ``scale`` of ``layer`` (a URL, for messages), or a ConfigError naming the key.

    ``inside``: absolute voxels a searched crop must also lie in (the caller checks a given ``roi_start``)."""
    size, path = wanted.crop_size, wanted.path
    if any(c > s for c, s in zip(size, scale.size)):
        raise ConfigError(f"params.yaml: {path}.crop_size: {list(size)} (z, y, x) is larger than scale "
                          f"{scale.key} of {layer} ({list(scale.size)} voxels, z, y, x)")
    if wanted.roi_start is not None:
        start, stop = wanted.roi_start, [a + c for a, c in zip(wanted.roi_start, size)]
        if any(a < o for a, o in zip(start, scale.voxel_offset)) or any(b > e for b, e in zip(stop, scale.stop)):
            raise ConfigError(f"params.yaml: {path}.roi_start: the crop {list(start)}..{stop} (z, y, x) leaves scale "
                              f"{scale.key} of {layer}, whose voxels are {list(scale.voxel_offset)}.."
                              f"{list(scale.stop)}")
        return Crop(start, tuple(stop), "roi_start")  # type: ignore[arg-type]
    return _search(wanted, scale, layer, *screen(), dataset, inside)


def _search(wanted: Wanted, scale: S, layer: str, screen: S, read: Callable[[Box], np.ndarray], dataset: str,
            inside: Box | None = None) -> Crop:
    size, tissue = wanted.crop_size, wanted.tissue
    positions = np.array([(s - c) // ch + 1 for s, c, ch in zip(scale.size, size, scale.chunk)], dtype=np.int64)
    rng = np.random.default_rng(wanted.seed)
    seen: dict[IntTriple, float] = {}
    candidates: list[dict[str, Any]] = []
    for _ in range(tissue.max_tries):
        start = tuple(int(o + ch * k) for o, ch, k in zip(scale.voxel_offset, scale.chunk, rng.integers(0, positions)))
        box = Box(start, tuple(a + c for a, c in zip(start, size)))  # type: ignore[arg-type]
        if inside is not None and not contains(inside, box):
            candidates.append({"start_zyx": list(box.start), "fraction": 0.0, "outside_layers": True})
            continue
        if box.start not in seen:
            coarse = coarse_box(box, scale, screen)
            if coarse.voxels > MAX_SCREEN_VOXELS:
                raise ConfigError(f"params.yaml: {wanted.path}.tissue.scale: screening a crop at scale {screen.key} "
                                  f"reads {coarse.voxels} voxels per candidate; choose a coarser scale of {layer}")
            seen[box.start] = round(float(np.count_nonzero(read(coarse))) / coarse.voxels, 6) if coarse.voxels else 0.0
        fraction = seen[box.start]
        candidates.append({"start_zyx": list(box.start), "fraction": fraction})
        if fraction >= tissue.min_fraction:
            log.info("%s: crop %s..%s (z, y, x) of scale %s after %s: %.1f%% of the %s voxels are non-zero", dataset,
                     list(box.start), list(box.stop), scale.key, tries(len(candidates)), 100 * fraction, screen.key)
            return Crop(box.start, box.stop, "search", {
                "seed": wanted.seed, "tries": len(candidates), "min_fraction": tissue.min_fraction,
                "max_tries": tissue.max_tries, "screening_scale": screen.key, "fraction": fraction,
                "candidates": candidates})
    best = max(candidates, key=lambda c: float(c["fraction"]))
    outside = sum(1 for c in candidates if c.get("outside_layers"))
    within = f", {outside} of them outside the other layers' bounds {list(inside.start)}..{list(inside.stop)}" \
        if inside is not None and outside else ""
    raise ConfigError(f"params.yaml: {wanted.path}.tissue: none of {len(candidates)} random {list(size)} crops "
                      f"(seed {wanted.seed}{within}) of {layer} scale {scale.key} has {tissue.min_fraction:.0%} "
                      "non-zero "
                      f"voxels at scale {screen.key} (best: {best['fraction']:.1%} at {best['start_zyx']}); lower "
                      "tissue.min_fraction, raise tissue.max_tries, change the seed or give roi_start")


# -- the blocks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropBlock:
    """One block of a crop: a chunk file of a local zarr store (an object of the shared copy)."""

    box: Box  # voxels of the crop
    relpath: str
    url: str
    store: str = STORE  # the store (folder in the raw folder) the block belongs to


@dataclass(frozen=True, eq=False)
class CropLayer:
    """One layer copied for the crop's box: its local store, the URL the record names, dtype and reader."""

    store: str  # folder in the raw folder: STORE for the image, e.g. "labels/neurons.zarr"
    url: str
    dtype: np.dtype
    read: Callable[[Box], np.ndarray]  # absolute voxels of the scale -> Z, Y, X array


def crop_blocks(crop: Crop, block: IntTriple, url: str, store: str = STORE) -> list[CropBlock]:
    """The blocks of a crop, C order, named as zarr v2 chunk keys (``i.j.k``) of a local store."""
    size = Box(crop.start, crop.stop).shape
    return [CropBlock(box, f"{store}/{'.'.join(map(str, index))}", url, store)
            for index, box in Grid(size, block).cells()]


def _identity(crop: Crop, scale: str, block: IntTriple, stores: Sequence[str] = (STORE,)) -> dict[str, Any]:
    """What a journalled block belongs to: a resumed fetch keeps blocks of this very crop only (a search
    is deterministic, but the server's coarse data could have changed in between)."""
    identity: dict[str, Any] = {"scale": scale, "start_zyx": list(crop.start), "block_zyx": list(block)}
    if list(stores) != [STORE]:  # an image-only crop keeps the identity it always had
        identity["stores"] = list(stores)
    return identity


def finished_blocks(ctx: FetchContext, crop: Crop, scale: str, block: IntTriple,
                    stores: Sequence[str] = (STORE,)) -> set[str]:
    """For ``plan``: the blocks an interrupted fetch of this crop finished (relpaths)."""
    return set(journalled(ctx, _identity(crop, scale, block, stores)))


def copy_crop(ctx: FetchContext, crop: Crop, scale: str, block: IntTriple,
              layers: Sequence[CropLayer]) -> dict[str, FetchedFile]:
    """Copy the crop of every layer into its local store block by block, in one journalled copy, resuming
    the blocks an interrupted fetch of this very crop finished; relpath -> file, each ``.zarray`` too."""
    identity = _identity(crop, scale, block, [layer.store for layer in layers])
    fresh = not journalled(ctx, identity)  # no block of this crop to resume: start the stores afresh
    size = Box(crop.start, crop.stop).shape
    by_store, blocks, zarrays = {}, [], {}
    for layer in layers:
        if fresh:
            shutil.rmtree(ctx.dest / layer.store, ignore_errors=True)
        local = CropStore(ctx.path(f"{layer.store}/.zarray").parent, size, block, layer.dtype, ctx.dataset)
        by_store[layer.store] = (layer, local.dtype)
        blocks += crop_blocks(crop, block, layer.url, layer.store)
        zarrays[f"{layer.store}/.zarray"] = (layer.url, local.folder / ".zarray")

    def start(obj: CropBlock) -> Callable[[], bytes]:
        box = obj.box.shifted(crop.start)
        layer, dtype = by_store[obj.store]
        return lambda: chunk_bytes(layer.read(box), block, dtype)

    files = copy_objects(ctx, blocks, start, desc=f"crop {scale}", unit="block", identity=identity)
    return {**files, **{rel: FetchedFile(url, path.stat().st_size, sha256_file(path))
                        for rel, (url, path) in zarrays.items()}}


def chunk_bytes(data: np.ndarray, block: IntTriple, dtype: np.dtype) -> bytes:
    """A block as its uncompressed zarr v2 chunk file: C order, little-endian, and an edge block padded
    to the full block with the fill value 0, as zarr stores edge chunks."""
    chunk = np.zeros(block, np.dtype(dtype).newbyteorder("<"))
    chunk[tuple(slice(0, n) for n in data.shape)] = data
    return chunk.tobytes()


def tensorstore_timeout(ctx: FetchContext) -> float:
    """The longest one tensorstore operation may take: every try of a request, with its waits."""
    policy = ctx.retry_policy
    return policy.connect_timeout + policy.attempts * (policy.read_timeout + policy.max_delay)


def tensorstore_context(ctx: FetchContext) -> dict[str, Any]:
    """The fetch context's bounded retries, more concurrent requests (a block is many chunks), a small cache."""
    base = ctx.tensorstore_context()
    return {**base, "http_request_concurrency": {"limit": 4 * max(1, ctx.workers)},
            "cache_pool": {"total_bytes_limit": 64 << 20}}


def bytes_per_chunk(scale: LayerScale, scale_url: str, chunks: list[IntTriple],
                     ctx: FetchContext) -> tuple[Any, str, list[str]]:
    """(chunk -> estimated bytes, how it was estimated, shard names) from a few HEAD requests."""
    if scale.sharding:
        by_shard: dict[str, int] = {}
        names = {pos: scale.shard_of(pos) for pos in chunks}
        for name in names.values():
            by_shard[name] = by_shard.get(name, 0) + 1
        total_chunks = math.prod(scale.grid)
        nominal = max(1.0, total_chunks / 2 ** int(scale.sharding["shard_bits"]))
        sizes = {}
        for name in sorted(by_shard):
            found = ctx.http.probe(f"{scale_url}/{name}")
            sizes[name] = (found.size or 0) if found else 0
        estimate = {name: min(size, size / nominal) for name, size in sizes.items()}
        return (lambda pos: estimate[names[pos]]), f"shard sizes from {len(sizes)} HEAD request(s)", sorted(by_shard)
    step = max(1, len(chunks) // HEAD_SAMPLE)
    sample = chunks[::step][:HEAD_SAMPLE]
    found_sizes: list[int] = []
    for pos in sample:
        found = ctx.http.probe(f"{scale_url}/{scale.chunk_name(pos)}")
        found_sizes.append((found.size or 0) if found else 0)
    mean = sum(found_sizes) / len(found_sizes) if found_sizes else 0.0
    return (lambda pos: mean), f"mean of {len(found_sizes)} sampled chunk(s)", []
