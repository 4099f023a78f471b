"""Neuroglancer precomputed image layers over HTTPS, as a seeded random crop inside tissue.

The layer's ``info`` is read first (over the HTTP client: bounded retries, one-line errors, an
unreachable host fails in seconds) and drives everything: scales, sizes, chunking, sharding,
encoding. Voxels are read through tensorstore's ``neuroglancer_precomputed`` driver over its
HTTP key-value store (public GCS needs no credentials this way), with the fetch context's
bounded retries; its X, Y, Z order becomes Z, Y, X once, in :mod:`emdata.formats.precomputed`.

The crop (:mod:`emdata.sources.fetch.crop`): ``crop_size`` voxels of the chosen ``scale``. With
``roi_start`` in params the crop starts there. Otherwise a seeded search draws starts on the scale's chunk grid inside its bounds
(``voxel_offset`` .. ``voxel_offset + size``; on the grid, so no chunk is read twice) and screens
each on a coarse scale: a candidate is accepted when at least ``tissue.min_fraction`` of the
coarse voxels it covers are non-zero (missing chunks are zero, as in neuroglancer), after at
most ``tissue.max_tries`` candidates. The same params give the same crop; the ROI, seed, tries,
every candidate's tissue fraction and the layer's ``info`` are recorded in ``source.json``
(``extra``) and in the metadata record (native metadata and description).

``fetch`` writes the decoded crop into ``data/raw/<ds>/crop.zarr`` (zarr v2, one uncompressed
chunk file per block of ``block`` voxels) block by block, through the object copy every array
source shares (:mod:`emdata.sources.fetch.objects`): memory holds a few blocks, never the crop,
and an interrupted fetch keeps the blocks it journalled for this very crop that still hash as
journalled and reads only the others. ``plan`` reports the
scale, the ROI, the chunks and shards it touches and the bytes it would transfer (estimated from
HEAD requests on the shards, or on a sample of the chunks).

Labels (``labels: {<name>: {layer: <path>}}``): each is another precomputed layer (a neuron
segmentation: uint64 body ids, ``compressed_segmentation``, sharded) read for exactly the EM
crop's box into ``labels/<name>.zarr`` in the same journalled block copy, ids as they are. ``layer``
is a full URL (as ``url``), or a path under the bucket of ``url``: its first path component, as in
GCS's ``https://storage.googleapis.com/<bucket>/<path>`` (``v1.2/segmentation`` next to
``emdata/clahe_yz/jpeg``); give a full URL for a layer in another bucket or on another host. The
label must have a scale at the image scale's resolution (precomputed voxel coordinates are absolute,
so voxel i of one is voxel i of the other), and the crop must lie inside both layers' bounds: a
search only accepts such crops, and any other mismatch is a one-line FormatError naming both grids.

params.yaml::

    source:
      kind: precomputed
      url: https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg
      scale: 8                      # nm (isotropic), [z, y, x] nm, or a scale key ("8.0x8.0x8.0")
      crop_size: [1000, 1000, 1000] # z, y, x voxels of that scale
      seed: 1                       # the random crop; not needed with roi_start
      roi_start: null               # [z, y, x] voxels of the scale: a fixed crop, no search
      tissue: {min_fraction: 0.9, max_tries: 100, scale: null}  # scale: the screening scale
      block: null                   # [z, y, x] voxels per block (default: one chunk deep, 4 x 4 chunks)
      labels: {neurons: {layer: v1.2/segmentation}}  # optional: label layers read for the same box
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emdata.params.schema import (
    Section,
    as_fields,
    as_fraction,
    as_int_range,
    as_int_triple,
    as_named,
    config_error,
    param,
    read_params,
)
from emdata.errors import FormatError, refetch_hint
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchRecord
from emdata.core.boxes import Box
from emdata.formats.precomputed import (STORE, CropVolume, Layer, Scale, http_requests_started, open_scale, parse_info,
                                        read)
from emdata.sources.fetch.files import FilePlan
from emdata.formats.precomputed_refs import (
    IntTriple,
    ScaleRef,
    as_layer_path,
    as_layer_url,
    as_scale,
    as_voxel_triple,
    bucket_root,
    find_scale,
    scale_dict,
)
from emdata.formats.precomputed_labels import LabelGrid, check_crop_inside, label_grid, label_store, labels_inside
from emdata.sources.fetch.crop import (
    Crop,
    CropLayer,
    bytes_per_chunk,
    choose_crop,
    copy_crop,
    crop_blocks,
    finished_blocks,
    screening_scale,
    tensorstore_context,
    tensorstore_timeout,
)

log = logging.getLogger(__name__)

KIND = "precomputed"
READERS = ("emdata.formats.precomputed", "emdata.formats.precomputed_labels", "emdata.formats.precomputed_refs")
DECODES_ON_FETCH = True  # fetch writes decoded voxels: the reader decides the raw bytes too
FETCHERS = ("emdata.sources.fetch.crop",)  # where the crop lies and how its blocks are stored

MAX_TRIES = 10_000


# -- params -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    min_fraction: float = param(as_fraction, 0.9)
    max_tries: int = param(as_int_range(1, MAX_TRIES), 100)
    scale: ScaleRef | None = param(as_scale, None)  # None: the coarsest scale spanning MIN_SPAN voxels of the crop

    def to_dict(self) -> dict[str, Any]:
        return {"min_fraction": self.min_fraction, "max_tries": self.max_tries, "scale": scale_dict(self.scale)}


@dataclass(frozen=True)
class LabelLayer:
    layer: str = param(as_layer_path)  # a full URL, or a path under the bucket of ``url``

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer}


@dataclass(frozen=True)
class Params:
    url: str = param(as_layer_url)  # the layer folder (holding ``info``), no trailing slash
    scale: ScaleRef = param(as_scale)
    crop_size: IntTriple = param(as_int_triple)
    seed: int | None = param(as_int_range(0, 2**63 - 1), None)
    roi_start: IntTriple | None = param(as_voxel_triple, None)
    tissue: Tissue = param(as_fields(Tissue), Tissue())
    block: IntTriple | None = param(as_int_triple, None)
    labels: dict[str, LabelLayer] = param(as_named(as_fields(LabelLayer)), {})
    path: str = "datasets.?.source"  # where these params live, for messages (not part of the spec)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "url": self.url, "scale": scale_dict(self.scale), "crop_size": list(self.crop_size),
                "seed": self.seed, "roi_start": None if self.roi_start is None else list(self.roi_start),
                "tissue": self.tissue.to_dict(), "block": None if self.block is None else list(self.block),
                **({"labels": {k: v.to_dict() for k, v in self.labels.items()}} if self.labels else {})}

    def label_urls(self) -> dict[str, str]:
        """name -> the label layer's URL (a relative ``layer`` resolved under the bucket of ``url``)."""
        root = bucket_root(self.url)
        out = {}
        for name, spec in self.labels.items():
            if spec.layer.startswith(("http://", "https://")):
                out[name] = spec.layer
            elif root is None:
                raise config_error(f"{self.path}.labels.{name}.layer", f"source.url {self.url} has no bucket to put "
                                   f"{spec.layer!r} under; give the label layer's full URL")
            else:
                out[name] = f"{root}/{spec.layer}"
        return out


def parse_params(sec: Section) -> Params:
    params = read_params(Params, sec, path=sec.path)
    if params.roi_start is None and params.seed is None:
        raise config_error(sec.key_path("seed"), "missing required key (the random crop needs a seed; "
                           "or give roi_start for a fixed crop)")
    params.label_urls()  # a relative layer needs a bucket: refused here, before any request
    return params


# -- the layer, the scale, the crop --------------------------------------------------------------


@dataclass
class Prepared:
    layer: Layer
    scale: Scale
    crop: Crop
    block: IntTriple
    timeout: float
    context: dict[str, Any]
    labels: dict[str, LabelGrid]

    @property
    def scale_url(self) -> str:
        return f"{self.layer.url}/{self.scale.key}"

    @property
    def stores(self) -> list[str]:
        return [STORE, *(grid.store for grid in self.labels.values())]


def prepare(params: Params, ctx: FetchContext) -> Prepared:
    layer = parse_info(ctx.http.get_json(f"{params.url}/info"), ctx.dataset, params.url)
    scale = find_scale(layer, params.scale, f"{params.path}.scale")
    timeout, context = tensorstore_timeout(ctx), tensorstore_context(ctx)
    grids = {}
    for name, url in params.label_urls().items():
        label = parse_info(ctx.http.get_json(f"{url}/info"), ctx.dataset, url)
        grids[name] = label_grid(name, label, layer, scale, ctx.dataset)
    inside = labels_inside(list(grids.values()), layer, scale, params.crop_size, ctx.dataset) if grids else None

    def screen() -> tuple[Scale, Callable[[Box], np.ndarray]]:
        chosen = (find_scale(layer, params.tissue.scale, f"{params.path}.tissue.scale") if params.tissue.scale
                  is not None else screening_scale(layer.scales, scale, params.crop_size))
        store = open_scale(layer, chosen, context, ctx.dataset, timeout)
        return chosen, lambda box: read(store, *box, ctx.dataset, f"{layer.url}/{chosen.key}", timeout)

    crop = choose_crop(params, scale, layer.url, screen, ctx.dataset, inside=inside)
    for grid in grids.values():  # a given roi_start is checked here (a search kept inside already)
        check_crop_inside(grid, layer, scale, Box(crop.start, crop.stop), ctx.dataset)
    # One chunk deep and 4 x 4 chunks wide (64 x 256 x 256 for 64^3 chunks) unless params say; at most the crop.
    block = params.block or (scale.chunk[0], 4 * scale.chunk[1], 4 * scale.chunk[2])
    block = tuple(min(b, c) for b, c in zip(block, params.crop_size))  # type: ignore[assignment]
    return Prepared(layer, scale, crop, block, timeout, context, grids)


def _extra(p: Prepared, params: Params) -> dict[str, Any]:
    s = p.scale
    return {
        "layer": {"url": p.layer.url, "info": p.layer.info},
        "scale": {"key": s.key, "index": s.index, "resolution_nm_zyx": list(s.resolution), "size_zyx": list(s.size),
                  "voxel_offset_zyx": list(s.voxel_offset), "chunk_zyx": list(s.chunk), "encoding": s.encoding,
                  "sharding": s.sharding, "data_type": p.layer.data_type},
        "roi": {"start_zyx": list(p.crop.start), "stop_zyx": list(p.crop.stop), "size_zyx": list(params.crop_size),
                "offset_nm_zyx": [a * r for a, r in zip(p.crop.start, s.resolution)], "chosen_by": p.crop.chosen_by},
        "search": p.crop.search,
        "store": {"path": "crop.zarr", "format": "zarr v2, uncompressed, C order", "block_zyx": list(p.block)},
        **({"labels": {name: _label_extra(grid) for name, grid in p.labels.items()}} if p.labels else {}),
    }


def _label_extra(grid: LabelGrid) -> dict[str, Any]:
    s = grid.scale
    return {"layer": {"url": grid.layer.url, "info": grid.layer.info},
            "scale": {"key": s.key, "index": s.index, "resolution_nm_zyx": list(s.resolution), "size_zyx": list(s.size),
                      "voxel_offset_zyx": list(s.voxel_offset), "chunk_zyx": list(s.chunk), "encoding": s.encoding,
                      "sharding": s.sharding, "data_type": grid.layer.data_type},
            "store": grid.store}


# -- the verbs ----------------------------------------------------------------------------------


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    p = prepare(params, ctx)
    scale, crop = p.scale, p.crop
    chunks = scale.chunks_in(crop.start, crop.stop)
    rows: list[FilePlan] = []
    finished = finished_blocks(ctx, crop, scale.key, p.block, p.stores)
    shards: list[str] = []
    how = ""
    for layer, lscale, url, store in [(p.layer, scale, p.scale_url, STORE),
                                      *((g.layer, g.scale, g.scale_url, g.store) for g in p.labels.values())]:
        per_chunk, how_here, shards_here = bytes_per_chunk(lscale, url, lscale.chunks_in(crop.start, crop.stop), ctx)
        if store == STORE:
            how, shards = how_here, shards_here
        for block in crop_blocks(crop, p.block, url, store):
            touched = lscale.chunks_in(*block.box.shifted(crop.start))
            done = block.relpath in finished
            wire = 0 if done else int(sum(per_chunk(pos) for pos in touched))
            rows.append(FilePlan(block.relpath, url, block.box.voxels * layer.dtype.itemsize,
                                 wire, 0 if done else len(touched), "done" if done else "new"))
    log.info("%s: %s scale %s; ROI z %d..%d, y %d..%d, x %d..%d voxels (%s); offset %s nm", ctx.dataset, p.layer.url,
             scale.label(), crop.start[0], crop.stop[0], crop.start[1], crop.stop[1], crop.start[2], crop.stop[2],
             crop.how_chosen(), [a * r for a, r in zip(crop.start, scale.resolution)])
    shard_text = f" in {len(shards)} shard(s) ({', '.join(shards[:6])}{', ...' if len(shards) > 6 else ''})" if shards else ""
    log.info("%s: %d chunk(s) of %s voxels (z, y, x)%s; about %.1f MiB on the wire (%s), %.1f MiB decoded, "
             "%d block(s) of %s", ctx.dataset, len(chunks), "x".join(map(str, scale.chunk)), shard_text,
             sum(r.to_transfer or 0 for r in rows) / 2**20, how,
             math.prod(params.crop_size) * p.layer.dtype.itemsize / 2**20, len(rows) // len(p.stores),
             "x".join(map(str, p.block)))
    for grid in p.labels.values():
        log.info("%s: label %s from %s scale %s, the same box", ctx.dataset, grid.name, grid.layer.url,
                 grid.scale.label())
    return rows


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    """The seeded crop, block by block (resumable); tensorstore's requests count in the fetch's."""
    before = http_requests_started()
    try:
        return _fetch(params, ctx)
    finally:
        ctx.other_requests += http_requests_started() - before


def _fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    p = prepare(params, ctx)
    layers = [_crop_layer(STORE, p.layer, p.scale, p, ctx),
              *(_crop_layer(g.store, g.layer, g.scale, p, ctx) for g in p.labels.values())]
    files = copy_crop(ctx, p.crop, p.scale.key, p.block, layers)
    return ctx.record(files, _extra(p, params))


def _crop_layer(store: str, layer: Layer, scale: Scale, p: Prepared, ctx: FetchContext) -> CropLayer:
    """A layer's reader of absolute boxes (the remote scale opened on the first read that needs it)."""
    url = f"{layer.url}/{scale.key}"
    remote = functools.cache(lambda: open_scale(layer, scale, p.context, ctx.dataset, p.timeout))
    return CropLayer(store, url, layer.dtype, lambda box: read(remote(), *box, ctx.dataset, url, p.timeout))


def _record_extra(raw: Path, dataset: str) -> dict[str, Any]:
    record = FetchRecord.load(raw)
    extra = record.extra if record is not None else {}
    if not extra.get("roi") or not extra.get("scale"):
        raise FormatError(dataset, str(raw / "source.json"), "the fetch record has no crop geometry",
                          refetch_hint(dataset))
    return extra


def open_volume(params: Params, raw: Path, dataset: str) -> CropVolume:
    extra = _record_extra(raw, dataset)
    res = tuple(float(v) for v in extra["scale"]["resolution_nm_zyx"])
    offset = tuple(float(v) for v in extra["roi"]["offset_nm_zyx"])
    return CropVolume(raw / STORE, dataset, voxel_size_nm=res, offset_nm=offset)  # type: ignore[arg-type]


def open_labels(params: Params, raw: Path, dataset: str) -> dict[str, CropVolume]:
    """Each label's crop (``labels/<name>.zarr``), on the image's grid: the same box of the same resolution."""
    if not params.labels:
        return {}
    extra = _record_extra(raw, dataset)
    offset = tuple(float(v) for v in extra["roi"]["offset_nm_zyx"])
    out = {}
    for name in params.labels:
        label = (extra.get("labels") or {}).get(name)
        if not label:
            raise FormatError(dataset, str(raw / "source.json"), f"the fetch record has no label {name!r}",
                              refetch_hint(dataset))
        res = tuple(float(v) for v in label["scale"]["resolution_nm_zyx"])
        out[name] = CropVolume(raw / label_store(name), dataset, voxel_size_nm=res,  # type: ignore[arg-type]
                               offset_nm=offset)  # type: ignore[arg-type]
    return out


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """The layer's ``info``, the scale, the ROI and how it was chosen (every candidate of the search), the labels."""
    extra = _record_extra(raw, dataset)
    return {"precomputed": {k: extra.get(k) for k in ("layer", "scale", "roi", "search", "store", "labels")
                            if k != "labels" or extra.get(k)}}


def describe(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """Flat record fields: the layer, the scale, the ROI, and the seed and tries that chose it."""
    extra = _record_extra(raw, dataset)
    search = extra.get("search") or {}
    return {"layer_url": extra["layer"]["url"], "scale_key": extra["scale"]["key"],
            "encoding": extra["scale"]["encoding"], "roi_start_zyx": extra["roi"]["start_zyx"],
            "roi_size_zyx": extra["roi"]["size_zyx"], "roi_chosen_by": extra["roi"]["chosen_by"],
            "seed": search.get("seed", params.seed), "tries": search.get("tries"),
            "tissue_fraction": search.get("fraction"), "screening_scale": search.get("screening_scale")}
