"""IDR (Image Data Resource) images: OMERO's JSON API for what the image is, two routes for its pixels.

An IDR image is named by its OMERO image id (optionally checked against a dataset id). ``fetch``
reads ``/api/v0/m/images/<id>/`` (sizes, pixel type, physical sizes with units; ``data`` may be
an object or a one-element list) and ``/webclient/imgData/<id>/`` (image, dataset and project
names, pixel sizes in µm), lists the dataset's images (``/api/v0/m/datasets/<id>/images/``,
paged by ``limit``/``offset`` as its ``meta`` says; a page that adds no image before
``totalCount`` is reached is an error) when a dataset id is given, and keeps the
answers under ``omero/`` in the raw folder. Then the pixels, by one of two routes (``pixels``):

``original`` (default)
    The submitted file from the EBI HTTPS mirror of the IDR FTP area, through the shared HTTP
    layer (resumable, verified). idr0086's files are classic big-endian ImageJ TIFFs, one strip
    per page, IFDs after the pixel data; :class:`emdata.formats.tiff.TiffStack` reads them slab by
    slab. After the download the TIFF's shape and dtype must equal the API's sizes and pixel type
    (and the file must hold all the planes the API counts), else a FormatError names both.
``render``
    For when the file is unavailable (IDR file paths have moved before): every plane rebuilt
    from ``/webgateway/render_image_region/<id>/<z>/0/?region=x,y,w,h`` as PNG with a grey
    0-255 window (``c=1|0:255$FFFFFF&m=g&format=png``, inversion off), tile by tile
    (``render.tile_size``), on the fetch context's bounded pool with the shared retry policy.
    Lossless only for uint8 images, so other pixel types are refused before any tile is asked
    for. ``format=png`` is honoured by OMERO's image-region microservice
    (omero-ms-image-region); plain OMERO.web answers JPEG whatever ``format`` says, so a tile
    that is not a PNG of the asked size, 8-bit grey (or RGB with equal channels), is refused.

Where the render route decodes: not during fetch. The tiles are kept as served
(``render/z<z>/y<y>_x<x>.png``), each with its URL, size and sha256 in the fetch record, which
is what a raw folder is everywhere else (``emdata verify`` re-hashes them). Tiles go through
the object copy every array source shares (:mod:`emdata.sources.fetch.objects`): a tile is
written atomically once it has passed its header check and journalled with its sha256, so an
interrupted fetch resumes tile by tile, keeping only tiles that still hash as journalled. Fetch
decides no voxel bytes (``DECODES_ON_FETCH = False``): a change to the PNG decoding
(:mod:`emdata.formats.png`) re-runs normalize only. The PNGs are decoded when normalize reads a
box. The price: greyscale arrives as RGB PNG, about 1.5 times the voxels on disk for noisy EM
(measured on the replica); decoding during fetch into a plain stack would mean its bytes could no
longer be checked against what the server sent.

Geometry: the voxel size comes from OMERO's physical sizes (units converted to nm); on the
original route it is cross-checked against the ImageJ tags (``XResolution``/``YResolution`` in
pixels per unit, ``spacing``, and ``unit``, whose ``\\u00B5m`` escape is decoded). More than 1 %
apart is a FormatError unless the dataset's ``geometry_trust`` names ``omero`` or ``imagej`` (or is
``params`` with ``voxel_size_nm`` given, which overrides both; :func:`emdata.core.geometry.pick`).
OMERO images carry no translation: the grid starts at the first voxel, offset (0, 0, 0).

Licence and DOIs come from params (``license``, ``doi``, ``citation``; ``source.paper_doi``);
image, dataset and project names from OMERO (``describe``), the study's from the project's
(IDR names projects ``<study>/<experiment>``). ``paper_doi`` and the dataset's
``geometry_trust`` do not change what is fetched, so they are not part of the fetch spec.

params.yaml::

    source:
      kind: idr
      omero_url: https://idr.openmicroscopy.org/
      image_id: 9846137
      dataset_id: 10740              # optional: the image must be in it
      pixels: original               # or render
      original:                      # needed for pixels: original
        base_url: https://ftp.ebi.ac.uk/pub/databases/IDR/idr0086-miron-micrographs/.../
        file: Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif
        size: 159884524
      render: {tile_size: 512}
      paper_doi: 10.1126/sciadv.aba8811
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from emdata.params.schema import (
    Section,
    as_choice,
    as_folder_url,
    as_int,
    as_int_range,
    as_str,
    config_error,
    param,
    read_params,
)
from emdata.errors import FetchError, FormatError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile, FetchRecord
from emdata.core.boxes import Grid
from emdata.formats.imagej import imagej_info
from emdata.formats import omero
from emdata.formats.omero import Pixels, check_tiff, list_page, open_tiff, parse_pixels, voxel_size
from emdata.formats.png import PngTiles, header_problem
from emdata.formats.raw import IntTriple, RawVolume
from emdata.formats.tiff import TiffStack
from emdata.sources.fetch.files import FilePlan, RemoteFile, as_remote_file, fetch_files, in_folder, plan_files
from emdata.sources.fetch.objects import copy_objects, journalled, store_object

KIND = "idr"
# Code that decides the normalized bytes; OMERO's answers parsed by formats.omero also decide the fetch record.
READERS = ("emdata.formats.tiff", "emdata.formats.imagej", "emdata.formats.png", "emdata.formats.omero")
FETCHERS = ("emdata.formats.omero",)
DECODES_ON_FETCH = False  # render tiles are stored as served and decoded by normalize (see above)

ROUTES = ("original", "render")
GEOMETRY_CANDIDATES = omero.GEOMETRY_CANDIDATES  # omero | imagej: names geometry_trust also takes (sources.dataset)
DEFAULT_TILE = 512  # best of 256-1121 in benchmarks/idr_routes.py here
IMAGE_JSON, IMGDATA_JSON, DATASET_JSON = "omero/image.json", "omero/imgData.json", "omero/dataset.json"
PAGE_LIMIT = 500  # OMERO's maxLimit; the server may cap it lower (its meta says)
JSON_MAX = 16 << 20
# The grey 0-255 window: for uint8 the identity, so the PNG holds the stored values.
RENDER_QUERY = {"c": "1|0:255$FFFFFF", "m": "g", "format": "png", "q": "1",
                "maps": json.dumps([{"inverted": {"enabled": False}}], separators=(",", ":"))}


# -- params -------------------------------------------------------------------------------------


def as_original(value: Any, path: str) -> RemoteFile:
    """``{base_url, file, size?, sha256?}``: the original file in a folder of the IDR FTP mirror."""
    sec = Section(value, path)
    base_url = sec.required("base_url", as_folder_url)
    return as_remote_file(in_folder(base_url))({k: v for k, v in sec.data.items() if k != "base_url"}, path)


@dataclass(frozen=True)
class Params:
    omero_url: str = param(as_folder_url)
    image_id: int = param(as_int)
    dataset_id: int | None = param(as_int, None)
    pixels: str = param(as_choice(ROUTES), "original")
    original: RemoteFile | None = param(as_original, None)  # required by the original route
    tile_size: int = param(as_int_range(16, 8192), DEFAULT_TILE, key="render.tile_size")
    paper_doi: str | None = param(as_str, None)  # descriptive (record only)
    geometry_trust: str | None = field(default=None, compare=False)  # the dataset's, set by sources.dataset

    def api(self, path: str) -> str:
        return urllib.parse.urljoin(self.omero_url, path)

    @property
    def image_url(self) -> str:
        return self.api(f"api/v0/m/images/{self.image_id}/")

    @property
    def imgdata_url(self) -> str:
        return self.api(f"webclient/imgData/{self.image_id}/")

    def to_dict(self) -> dict[str, Any]:
        """The fetch spec: what decides the fetched bytes (not ``paper_doi`` or ``geometry_trust``)."""
        out: dict[str, Any] = {"kind": KIND, "omero_url": self.omero_url, "image_id": self.image_id,
                               "dataset_id": self.dataset_id, "pixels": self.pixels}
        if self.pixels == "original":
            out["original"] = self.original.to_dict() if self.original else None
        else:
            out["render"] = {"tile_size": self.tile_size}
        return out


def parse_params(sec: Section) -> Params:
    params = read_params(Params, sec)
    if params.pixels == "original" and params.original is None:
        raise config_error(sec.key_path("original"), "missing required section (pixels: original fetches this file)")
    sec.finish()
    return params


# -- what OMERO says ----------------------------------------------------------------------------


def _get_json(params: Params, ctx: FetchContext, url: str, what: str) -> Any:
    try:
        return ctx.http.get_json(url, max_bytes=JSON_MAX)
    except FetchError as exc:
        if exc.status == 404:
            raise FetchError(ctx.dataset, url, f"OMERO has no {what} (HTTP 404)",
                             "check source.image_id / source.dataset_id and source.omero_url in params.yaml") from exc
        raise


def _store_json(ctx: FetchContext, relpath: str, url: str, data: Any) -> FetchedFile:
    return store_object(ctx, relpath, url, (json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False)
                                            + "\n").encode("utf-8"))


def _dataset_images(params: Params, ctx: FetchContext) -> tuple[str, list[dict[str, Any]]]:
    """Every image of the dataset, page by page as the answers' ``meta`` says.

    Each page must add images not listed before until ``totalCount`` is reached: a server that
    ignores ``offset`` (the same page again) or ends early is one FormatError, not an endless loop
    or a short listing.
    """
    base = params.api(f"api/v0/m/datasets/{params.dataset_id}/images/")
    images: dict[Any, dict[str, Any]] = {}  # by @id
    offset = 0
    while True:
        url = f"{base}?{urllib.parse.urlencode({'limit': PAGE_LIMIT, 'offset': offset})}"
        answer = _get_json(params, ctx, url, f"dataset {params.dataset_id}")
        new, total, length = list_page(answer, url, images, offset, f"dataset {params.dataset_id}", ctx.dataset)
        images.update(new)
        offset += length
        if offset >= total:
            return base, list(images.values())


def _fetch_omero(params: Params, ctx: FetchContext) -> tuple[dict[str, FetchedFile], Pixels]:
    """The image's API answers, checked and kept under ``omero/``; the Pixels they describe."""
    files = {}
    answer = _get_json(params, ctx, params.image_url, f"image {params.image_id}")
    pixels = parse_pixels(ctx.dataset, params.image_url, answer)
    if pixels.channels != 1 or pixels.timepoints != 1:
        raise FormatError(ctx.dataset, params.image_url, f"image {params.image_id} has {pixels.channels} channels "
                          f"and {pixels.timepoints} time points; only single-channel, single-time-point "
                          "volumes are supported", "choose another image id")
    files[IMAGE_JSON] = _store_json(ctx, IMAGE_JSON, params.image_url, answer)
    files[IMGDATA_JSON] = _store_json(ctx, IMGDATA_JSON, params.imgdata_url,
                                      _get_json(params, ctx, params.imgdata_url, f"image {params.image_id}"))
    if params.dataset_id is not None:
        url, members = _dataset_images(params, ctx)
        ids = [m.get("@id") for m in members]
        if params.image_id not in ids:
            raise FormatError(ctx.dataset, url, f"image {params.image_id} is not in dataset {params.dataset_id} "
                              f"(its {len(ids)} images: {', '.join(map(str, ids[:5]))}{' ...' if len(ids) > 5 else ''})",
                              "check source.image_id and source.dataset_id in params.yaml")
        listing = {"dataset_id": params.dataset_id, "images": [{"@id": m.get("@id"), "Name": m.get("Name")}
                                                               for m in members]}
        files[DATASET_JSON] = _store_json(ctx, DATASET_JSON, url, listing)
    return files, pixels


def _load_json(raw: Path, relpath: str, dataset: str) -> Any:
    try:
        return json.loads((raw / relpath).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FormatError(dataset, str(raw / relpath), f"cannot be read ({exc})",
                          f"delete data/raw/{dataset} and run `emdata fetch {dataset}` again") from exc


def _pixels_from_raw(params: Params, raw: Path, dataset: str) -> Pixels:
    answer = _load_json(raw, IMAGE_JSON, dataset)
    return parse_pixels(dataset, str(raw / IMAGE_JSON), answer)


# -- the original route ---------------------------------------------------------------------------


def _fetch_original(params: Params, ctx: FetchContext, pixels: Pixels) -> dict[str, FetchedFile]:
    assert params.original is not None  # parse_params requires it for this route
    files = fetch_files(ctx, [params.original])
    path = ctx.dest / params.original.name
    try:
        check_tiff(ctx.dataset, params.original.url, path, pixels, params.image_url)
    except FormatError as exc:
        path.unlink(missing_ok=True)  # never resume from, or keep, a file that is not this image
        if exc.where == params.original.url:
            raise
        raise FormatError(ctx.dataset, params.original.url, exc.problem,
                          "the file on the server may be damaged; try again later or use pixels: render") from exc
    return files


# -- the render route -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One rendered tile of a plane: where it goes in the raw folder and the URL that renders it."""

    relpath: str
    url: str
    height: int
    width: int


def tiles(params: Params, shape: IntTriple) -> list[Tile]:
    """The render tiles of every plane, plane by plane, rows then columns (edge tiles narrower)."""
    out = []
    for _, box in Grid(shape, (1, params.tile_size, params.tile_size)).cells():
        (z, y, x), (_, h, w) = box.start, box.shape
        query = urllib.parse.urlencode({"region": f"{x},{y},{w},{h}", **RENDER_QUERY}, safe=",:$")
        path = params.api(f"webgateway/render_image_region/{params.image_id}/{z}/0/")
        out.append(Tile(_tile_path(z, y, x), f"{path}?{query}", h, w))
    return out


def _refuse_lossy(params: Params, dataset: str, pixels: Pixels) -> None:
    if pixels.pixel_type != "uint8":
        raise FormatError(dataset, params.image_url, f"image {params.image_id} is {pixels.pixel_type}; rendered "
                          "planes are 8-bit, so pixels: render is lossless only for uint8 images",
                          "use pixels: original")


def _fetch_tiles(params: Params, ctx: FetchContext, pixels: Pixels) -> dict[str, FetchedFile]:
    """Every tile as served, through the shared object copy (resumed tile by tile)."""
    _refuse_lossy(params, ctx.dataset, pixels)
    cancel = threading.Event()  # once one tile has failed for good, the others stop retrying

    def start(tile: Tile) -> Callable[[], bytes]:
        return lambda: _tile_bytes(ctx, tile, cancel)

    return copy_objects(ctx, tiles(params, pixels.shape), start, desc="render tiles", unit="tile", cancel=cancel)


def _tile_bytes(ctx: FetchContext, tile: Tile, cancel: threading.Event) -> bytes:
    """A tile's PNG, refused unless it is a lossless PNG of the asked size."""
    data = ctx.http.get_bytes(tile.url, max_bytes=tile.width * tile.height * 3 + (1 << 16), accept="image/png",
                              cancel=cancel)
    problem = header_problem(data, tile.width, tile.height)
    if problem:  # plain OMERO.web answers JPEG whatever format says; other encodings are lossy
        raise FormatError(ctx.dataset, tile.url, f"{problem} (a lossless PNG tile was asked for)",
                          "use pixels: original, or an OMERO server that renders PNG (omero-ms-image-region)")
    return data


def _tile_path(z: int, y: int, x: int) -> str:
    return f"render/z{z:05d}/y{y:05d}_x{x:05d}.png"


# -- verbs ----------------------------------------------------------------------------------------


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    plans = [FilePlan(name, url, None, None, 1, "new") for name, url in
             ((IMAGE_JSON, params.image_url), (IMGDATA_JSON, params.imgdata_url))]
    if params.pixels == "original":
        assert params.original is not None
        return plans + plan_files(ctx, [params.original])
    answer = _get_json(params, ctx, params.image_url, f"image {params.image_id}")
    pixels = parse_pixels(ctx.dataset, params.image_url, answer)
    _refuse_lossy(params, ctx.dataset, pixels)
    todo = tiles(params, pixels.shape)
    finished = journalled(ctx)
    left = [t for t in todo if t.relpath not in finished]
    state = "new" if len(left) == len(todo) else "resume" if left else "done"
    return plans + [FilePlan(f"render/ ({len(todo)} PNG tiles)", todo[0].url if todo else params.image_url,
                             None, None, len(left), state)]


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    files, pixels = _fetch_omero(params, ctx)
    if params.pixels == "original":
        files.update(_fetch_original(params, ctx, pixels))
    else:
        files.update(_fetch_tiles(params, ctx, pixels))
    extra = {"omero_image_id": params.image_id, "pixels": params.pixels, "shape_zyx": list(pixels.shape),
             "pixel_type": pixels.pixel_type}
    if params.pixels == "render":
        extra["tile_size"] = params.tile_size
    return ctx.record(files, extra)


def open_volume(params: Params, raw: Path, dataset: str) -> RawVolume:
    pixels = _pixels_from_raw(params, raw, dataset)
    if params.pixels == "render":
        return PngTiles(raw, dataset, pixels.shape, params.tile_size, _tile_path,
                        voxel_size_nm=pixels.voxel_size_nm, offset_nm=(0.0, 0.0, 0.0))
    assert params.original is not None
    return open_tiff(raw / params.original.name, pixels, params.image_url, params.geometry_trust, dataset)


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """OMERO's answers as fetched, and the TIFF's tags with its ImageJ metadata (original route)."""
    omero = {name.split("/")[1].removesuffix(".json"): _load_json(raw, name, dataset)
             for name in (IMAGE_JSON, IMGDATA_JSON, DATASET_JSON) if (raw / name).is_file()}
    out: dict[str, Any] = {"omero": omero}
    if params.pixels == "original":
        assert params.original is not None
        path = raw / params.original.name
        with TiffStack(path, dataset) as stack:
            out["tiff"] = {params.original.name: {**stack.tags(), **imagej_info(path, dataset)}}
    else:
        out["render"] = {"tile_size": params.tile_size, "query": RENDER_QUERY}
    return out


def describe(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """Names from OMERO (image, dataset, project, IDR study), the route, where the voxel size came from."""
    meta = _load_json(raw, IMGDATA_JSON, dataset).get("meta") or {}
    pixels = _pixels_from_raw(params, raw, dataset)
    info = imagej_info(raw / params.original.name, dataset) if params.pixels == "original" and params.original else None
    _, origin = voxel_size(pixels, info, params.geometry_trust, dataset, str(raw))
    project = meta.get("projectName")
    out = {
        "omero_image_id": params.image_id,
        "image_name": meta.get("imageName"),
        "dataset_name": meta.get("datasetName"),
        "dataset_id": meta.get("datasetId"),
        "project_name": project,
        "study_name": project.split("/")[0] if isinstance(project, str) and project else None,
        "paper_doi": params.paper_doi,
        "pixels_route": params.pixels,
        "voxel_size_from": origin,
        "viewer_url": params.api(f"webclient/img_detail/{params.image_id}/"
                                 + (f"?dataset={params.dataset_id}" if params.dataset_id is not None else "")),
    }
    return {k: v for k, v in out.items() if v is not None}
