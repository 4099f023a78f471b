"""Offline replica of IDR: the OMERO JSON API and webgateway, and the EBI HTTPS mirror of its FTP area.

One loopback server plays both hosts, on their real paths:

- ``/api/v0/m/images/<id>/`` -> ``{"data": {Image}}`` (marshalled as omero-marshal does: ``@id``,
  ``@type``, ``Name``, ``Pixels`` with ``SizeX..T``, ``Type.value``, ``PhysicalSize*`` as
  ``{"@type": "TBD#LengthI", "Unit": "MICROMETER", "Symbol": "µm", "Value": ...}``); unknown ids
  answer 404 with JSON ``{"message": "Image <id> not found"}`` as OMERO.web's API does;
- ``/api/v0/m/datasets/<id>/images/?limit=&offset=`` -> ``{"data": [...], "meta": {offset, limit,
  maxLimit, totalCount}}``; the limit is capped at ``max_limit`` (500 on the real server; tests
  lower it to make clients page);
- ``/api/v0/m/datasets/<id>/`` -> ``{"data": {Dataset}}``;
- ``/webclient/imgData/<id>/`` and ``/webgateway/imgData/<id>/`` -> OMERO.web's ``imageMarshal``
  dict (``meta`` with image/dataset/project names, ``size``, ``pixel_size`` in µm, ``channels``...);
- ``/webgateway/render_image_region/<id>/<z>/<t>/?region=x,y,w,h&c=1|s:e$RRGGBB&m=g&format=png``
  -> the region rendered as the image-region microservice does: the channel window mapped
  linearly to 0-255, greyscale (``m=g``) as 8-bit RGB with equal channels; PNG when asked,
  JPEG otherwise (OMERO's default);
- ``/pub/databases/IDR/idr0086-miron-micrographs/...`` -> the original files, written as ImageJ
  1.52p writes them (see :func:`write_imagej_tiff`), served statically with Range.

Images: idr0086's U2OS pair (``..._xy.tif``, and ``..._xz.tif``, the same volume resliced) in
dataset 10740 ``U2OS_chromatin``, and a HeLa file whose real name has a ``+``. Ids other than
9846137 and 10740 are the replica's own, not the real service's.
"""

from __future__ import annotations

import io
import json
import struct
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

OMERO_HOST = "https://idr.openmicroscopy.org/"
EBI_ROOT = "/pub/databases/IDR/"
STUDY = "idr0086-miron-micrographs"
FOLDER = f"{EBI_ROOT}{STUDY}/20200610-ftp/experimentD/Miron_FIB-SEM/Miron_FIB-SEM_processed/"
U2OS_XY = "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif"
U2OS_XZ = "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xz.tif"
HELA_PLUS = "Figure_S3F+1F_FIB-SEM_HeLa_G1_4x4x4nm_FIB-SEM_Ilastik_xz.tif"
IMAGE_ID, XZ_ID, HELA_ID = 9846137, 9846138, 9846139
DATASET_ID, HELA_DATASET_ID, PROJECT_ID = 10740, 10739, 1103
TEST_SHAPE = (7, 23, 37)  # z, y, x: odd and non-cubic
DEMO_SHAPE = (46, 194, 281)  # about a quarter of the real 184 × 775 × 1121 per axis
OME = "http://www.openmicroscopy.org/Schemas/OME/2016-06#"


# -- the original files -------------------------------------------------------------------------


def imagej_description(depth: int, spacing_um: float, vmin: float, vmax: float, unit: str = "\\u00B5m") -> bytes:
    """ImageJ's ImageDescription as 1.52p writes it: ``key=value`` lines, a newline and a NUL at the end."""
    text = (f"ImageJ=1.52p\nimages={depth}\nslices={depth}\nunit={unit}\nspacing={spacing_um:g}\nloop=false\n"
            f"min={vmin:.1f}\nmax={vmax:.1f}\n")
    return text.encode("ascii") + b"\0"


def write_imagej_tiff(path: Path, volume: np.ndarray, *, pixel_um: float = 0.02, spacing_um: float = 0.02,
                      display: tuple[float, float] = (36.0, 199.0)) -> Path:
    """A classic big-endian (``MM``) uint8 ImageJ stack with the real files' tag structure.

    Header, the first IFD (13 entries), the description, X/YResolution (pixels per µm as
    ``round(1e6 / pixel_um) / 1000000``: 50000000/1000000 for 20 nm), then every page as one
    uncompressed strip, contiguous, then the other IFDs, which share the first IFD's description
    and resolution values. For 184 pages of 775 × 1121 the first strip is at 278 and the file
    has 159,884,524 bytes, as the real ``..._xy.tif``.
    """
    if volume.ndim != 3 or volume.dtype != np.uint8:
        raise ValueError("a 3D uint8 volume is expected")
    depth, height, width = volume.shape
    desc = imagej_description(depth, spacing_um, *display)
    entries, ifd_size = 13, 2 + 13 * 12 + 4
    desc_at = 8 + ifd_size
    res_at = desc_at + len(desc)
    data_at = res_at + 16
    plane = height * width
    data_end = data_at + depth * plane

    def short(value: int) -> bytes:
        return struct.pack(">HH", value, 0)  # left-justified in the 4-byte field (big-endian)

    def long(value: int) -> bytes:
        return struct.pack(">I", value)

    def ifd(i: int, next_ifd: int) -> bytes:
        tags = [(254, 4, 1, long(0)), (256, 4, 1, long(width)), (257, 4, 1, long(height)), (258, 3, 1, short(8)),
                (262, 3, 1, short(1)), (270, 2, len(desc), long(desc_at)), (273, 4, 1, long(data_at + i * plane)),
                (277, 3, 1, short(1)), (278, 3, 1, short(height)), (279, 4, 1, long(plane)),
                (282, 5, 1, long(res_at)), (283, 5, 1, long(res_at + 8)), (296, 3, 1, short(1))]
        assert len(tags) == entries
        body = b"".join(struct.pack(">HHI", tag, kind, count) + value for tag, kind, count, value in tags)
        return struct.pack(">H", entries) + body + long(next_ifd)

    path.parent.mkdir(parents=True, exist_ok=True)
    per_um = round(1e6 / pixel_um)
    with open(path, "wb") as fh:
        fh.write(b"MM" + struct.pack(">HI", 42, 8))
        fh.write(ifd(0, data_end if depth > 1 else 0))
        fh.write(desc)
        fh.write(struct.pack(">II", per_um, 1_000_000) * 2)
        for section in volume:  # one strip per page, straight after the header
            fh.write(np.ascontiguousarray(section).tobytes())
        for i in range(1, depth):  # the remaining IFDs after the pixel data, as ImageJ writes them
            fh.write(ifd(i, data_end + i * ifd_size if i < depth - 1 else 0))
    return path


# -- the service ---------------------------------------------------------------------------------


@dataclass
class IdrImage:
    id: int
    name: str
    dataset_id: int
    array: np.ndarray  # z, y, x
    voxel_um: tuple[float, float, float]  # z, y, x as OMERO reports them
    file: str | None = None  # URL path of the original file on the EBI mirror
    pixels_override: dict[str, Any] = field(default_factory=dict)  # fault injection: what the API misreports


@dataclass
class IdrReplica:
    root: Path
    images: dict[int, IdrImage] = field(default_factory=dict)
    datasets: dict[int, tuple[str, int]] = field(default_factory=lambda: {
        DATASET_ID: ("U2OS_chromatin", PROJECT_ID), HELA_DATASET_ID: ("HeLa_chromatin", PROJECT_ID)})
    projects: dict[int, str] = field(default_factory=lambda: {PROJECT_ID: f"{STUDY}/experimentD"})
    max_limit: int = 500
    renders: int = 0  # render_image_region answers so far
    render_cache: dict[tuple[Any, ...], tuple[bytes, str]] | None = None  # a dict: answers kept (benchmarks)

    # -- JSON bodies, shaped as OMERO.web's -------------------------------------------------

    def image_json(self, img: IdrImage) -> dict[str, Any]:
        z, y, x = img.array.shape
        pixel_type = {np.dtype(np.uint8): "uint8", np.dtype(np.uint16): "uint16"}[img.array.dtype]

        def length(um: float) -> dict[str, Any]:
            return {"@type": "TBD#LengthI", "Unit": "MICROMETER", "Symbol": "µm", "Value": um}

        pixels = {"@id": img.id, "@type": OME + "Pixels", "SizeX": x, "SizeY": y, "SizeZ": z, "SizeC": 1, "SizeT": 1,
                  "PhysicalSizeX": length(img.voxel_um[2]), "PhysicalSizeY": length(img.voxel_um[1]),
                  "PhysicalSizeZ": length(img.voxel_um[0]), "SignificantBits": 8 * img.array.dtype.itemsize,
                  "Type": {"@type": "TBD#PixelsType", "value": pixel_type},
                  "DimensionOrder": {"@type": "TBD#DimensionOrder", "value": "XYZCT"},
                  "omero:sha1": "replica", "Channels": [{"@id": img.id, "@type": OME + "Channel",
                                                         "omero:LogicalChannelId": img.id}]}
        pixels.update(img.pixels_override)
        return {"@id": img.id, "@type": OME + "Image", "Name": img.name, "AcquisitionDate": 1591747200000,
                "omero:series": 0, "omero:archived": False, "Pixels": pixels,
                "omero:details": {"@type": "TBD#Details", "permissions": {"isGroupRead": True}}}

    def img_data(self, img: IdrImage) -> dict[str, Any]:
        dataset, project_id = self.datasets[img.dataset_id]
        z, y, x = img.array.shape
        return {"id": img.id, "meta": {"imageName": img.name, "imageDescription": "", "imageAuthor": "Public data",
                                       "projectName": self.projects[project_id], "projectId": project_id,
                                       "projectDescription": "", "datasetName": dataset, "datasetId": img.dataset_id,
                                       "datasetDescription": "", "wellSampleId": "", "wellId": "",
                                       "imageTimestamp": 1591747200.0, "imageId": img.id,
                                       "pixelsType": self.image_json(img)["Pixels"]["Type"]["value"]},
                "perms": {"canAnnotate": False, "canEdit": False, "canDelete": False, "canLink": False},
                "tiles": False, "interpolate": True, "size": {"width": x, "height": y, "z": z, "t": 1, "c": 1},
                "pixel_size": {"x": img.voxel_um[2], "y": img.voxel_um[1], "z": img.voxel_um[0]},
                "init_zoom": 0, "pixel_range": [0, 255],
                "channels": [{"emissionWave": None, "label": "0", "color": "808080", "inverted": False,
                              "reverseIntensity": False, "family": "linear", "coefficient": 1.0, "active": True,
                              "window": {"min": 0.0, "max": 255.0, "start": 36.0, "end": 199.0}}],
                "split_channel": {}, "rdefs": {"model": "greyscale", "projection": "normal", "defaultZ": z // 2,
                                                "defaultT": 0, "invertAxis": False}}

    # -- handlers: (match, query) -> (status, body, content type) -----------------------------

    @staticmethod
    def _json(status: int, data: Any) -> tuple[int, bytes, str]:
        return status, json.dumps(data).encode("utf-8"), "application/json"

    def _not_found(self, what: str, ident: str) -> tuple[int, bytes, str]:
        return self._json(404, {"message": f"{what} {ident} not found"})

    def api_image(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        img = self.images.get(int(match.group(1)))
        return self._not_found("Image", match.group(1)) if img is None else self._json(200, {"data": self.image_json(img)})

    def api_dataset(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        ident = int(match.group(1))
        if ident not in self.datasets:
            return self._not_found("Dataset", match.group(1))
        name, _ = self.datasets[ident]
        return self._json(200, {"data": {"@id": ident, "@type": OME + "Dataset", "Name": name}})

    def api_dataset_images(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        ident = int(match.group(1))
        if ident not in self.datasets:
            return self._not_found("Dataset", match.group(1))
        try:
            limit = int(query.get("limit", ["200"])[0])
            offset = int(query.get("offset", ["0"])[0])
        except ValueError as exc:
            return self._json(400, {"message": str(exc)})
        limit = min(200 if limit < 0 else limit, self.max_limit)
        offset = max(0, offset)
        members = sorted((img for img in self.images.values() if img.dataset_id == ident), key=lambda i: i.name.lower())
        page = [self.image_json(img) for img in members[offset:offset + limit]]
        meta = {"offset": offset, "limit": limit, "maxLimit": self.max_limit, "totalCount": len(members)}
        return self._json(200, {"data": page, "meta": meta})

    def imgdata(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        img = self.images.get(int(match.group(1)))
        if img is None:  # OMERO.web raises Http404: Django's HTML page, not JSON
            return 404, b"<!doctype html><html><body><h1>Not Found</h1></body></html>\n", "text/html"
        return self._json(200, self.img_data(img))

    def render_region(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        key = (match.groups(), tuple(sorted((k, tuple(v)) for k, v in query.items())))
        if self.render_cache is not None and key in self.render_cache:
            body, ctype = self.render_cache[key]
            return 200, body, ctype
        status, body, ctype = self._render(match, query)
        if self.render_cache is not None and status == 200:
            self.render_cache[key] = (body, ctype)
        return status, body, ctype

    def _render(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        from PIL import Image

        img = self.images.get(int(match.group(1)))
        if img is None:
            return 404, b"<!doctype html><html><body><h1>Not Found</h1></body></html>\n", "text/html"
        z, t = int(match.group(2)), int(match.group(3))
        depth, height, width = img.array.shape
        try:
            x, y, w, h = (int(v) for v in query["region"][0].split(","))
            channel, _, rest = query["c"][0].partition("|")
            window, _, colour = rest.partition("$")
            start, end = (float(v) for v in window.split(":"))
        except (KeyError, ValueError):
            return 400, b"malformed region or c argument\n", "text/plain"
        fmt = query.get("format", ["jpeg"])[0]
        if not (0 <= z < depth and t == 0 and channel == "1" and 0 <= x and 0 <= y and w > 0 and h > 0
                and x + w <= width and y + h <= height and end > start) or fmt not in ("jpeg", "png", "tif"):
            return 400, b"region, plane or channel outside the image\n", "text/plain"
        inverted = False
        if "maps" in query:
            maps = json.loads(query["maps"][0])
            inverted = bool(maps and (maps[0].get("inverted") or {}).get("enabled"))
        values = img.array[z, y:y + h, x:x + w].astype(np.float64)
        grey = np.clip(np.rint((values - start) * 255.0 / (end - start)), 0, 255).astype(np.uint8)
        if inverted:
            grey = 255 - grey
        if query.get("m", ["c"])[0] == "g" or colour.upper() == "FFFFFF":
            rgb = np.repeat(grey[:, :, None], 3, axis=2)
        else:
            tint = np.array([int(colour[i:i + 2], 16) for i in (0, 2, 4)], np.float64) / 255.0
            rgb = np.rint(grey[:, :, None] * tint).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(out, "PNG" if fmt == "png" else "TIFF" if fmt == "tif" else "JPEG")
        self.renders += 1
        ctype = {"png": "image/png", "tif": "image/tiff"}.get(fmt, "image/jpeg")
        return 200, out.getvalue(), ctype

    def serve(self, server: ReplicaServer) -> None:
        server.route(r"/api/v0/m/images/(\d+)/", self.api_image)
        server.route(r"/api/v0/m/datasets/(\d+)/", self.api_dataset)
        server.route(r"/api/v0/m/datasets/(\d+)/images/", self.api_dataset_images)
        server.route(r"/(?:webclient|webgateway)/imgData/(\d+)/", self.imgdata)
        server.route(r"/webgateway/render_image_region/(\d+)/(\d+)/(\d+)/", self.render_region)

    def url_path(self, image_id: int) -> str:
        file = self.images[image_id].file
        assert file is not None
        return file


def build_idr_replica(root: Path, *, shape: tuple[int, int, int] = TEST_SHAPE, coordinate: bool = True) -> IdrReplica:
    """Write the original files under ``root`` and describe the images the API serves."""
    replica = IdrReplica(Path(root))
    volume = coordinate_volume(shape) if coordinate else em_like_volume(shape, seed=86)
    resliced = np.ascontiguousarray(volume.transpose(1, 0, 2))  # the _xz file: pages are Y, rows are Z
    hela = (coordinate_volume((9, 21, 31)) if coordinate else em_like_volume((12, 40, 60), seed=3))[::-1].copy()
    for img in (IdrImage(IMAGE_ID, U2OS_XY, DATASET_ID, volume, (0.02, 0.02, 0.02), FOLDER + U2OS_XY),
                IdrImage(XZ_ID, U2OS_XZ, DATASET_ID, resliced, (0.02, 0.02, 0.02), FOLDER + U2OS_XZ),
                IdrImage(HELA_ID, HELA_PLUS, HELA_DATASET_ID, hela, (0.004, 0.004, 0.004), FOLDER + HELA_PLUS)):
        replica.images[img.id] = img
        write_imagej_tiff(replica.root / img.file.lstrip("/"), img.array,  # type: ignore[union-attr]
                          pixel_um=img.voxel_um[2], spacing_um=img.voxel_um[0])
    return replica


def idr_entry(server_url: str, image_id: int = IMAGE_ID, *, pixels: str = "original",
              tile_size: int | None = None) -> dict[str, Any]:
    """A params.yaml ``datasets`` entry for idr0086's U2OS image (or another replica image) on the replica."""
    files = {IMAGE_ID: U2OS_XY, XZ_ID: U2OS_XZ, HELA_ID: HELA_PLUS}
    dataset = {IMAGE_ID: DATASET_ID, XZ_ID: DATASET_ID, HELA_ID: HELA_DATASET_ID}[image_id]
    source: dict[str, Any] = {
        "kind": "idr", "omero_url": server_url + "/", "image_id": image_id, "dataset_id": dataset, "pixels": pixels,
        "original": {"base_url": server_url + urllib.parse.quote(FOLDER), "file": files[image_id]},
        "paper_doi": "10.1126/sciadv.aba8811",
    }
    if tile_size is not None:
        source["render"] = {"tile_size": tile_size}
    return {"title": "IDR idr0086 U2OS chromatin FIB-SEM (replica)", "modality": "FIB-SEM", "license": "CC BY 4.0",
            "citation": "Miron E et al., Sci Adv 2020, doi:10.1126/sciadv.aba8811 (replica data)",
            "accession": "idr0086", "doi": "10.17867/10000141", "source": source}


@dataclass
class RunningIdr:
    replica: IdrReplica
    server: ReplicaServer

    def cases(self) -> list[ReplicaCase]:
        img = self.replica.images[IMAGE_ID]
        rel = img.name
        return [ReplicaCase("idr0086_u2os", idr_entry(self.server.url), {"raw": img.array}, (20.0, 20.0, 20.0),
                            (0.0, 0.0, 0.0), fault_path=img.file, files={rel: img.file or ""})]

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """Point a real IDR entry at the replica: OMERO URL, EBI folder; size/sha256 pins dropped."""
        out = {**dataset, "source": dict(dataset["source"])}
        src = out["source"]
        image_id = src.get("image_id")
        if image_id not in self.replica.images:
            raise EmdataError(f"demo: {key}: the IDR replica has no image {image_id!r} "
                              f"(it serves {', '.join(map(str, sorted(self.replica.images)))})")
        src["omero_url"] = self.server.url + "/"
        if src.get("original"):
            base = urllib.parse.urlsplit(src["original"]["base_url"])
            src["original"] = {k: v for k, v in src["original"].items() if k not in ("size", "sha256")}
            src["original"]["base_url"] = self.server.url + base.path
        return out


class _IdrReplicaKind:
    kind = "idr"
    transport = "http"
    case_keys = ("idr0086_u2os",)

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True, shape: tuple[int, int, int] | None = None,
              ) -> Iterator[RunningIdr]:
        """Coordinate-encoded small volumes for tests; EM-like ones for the demo (nicer thumbnails)."""
        replica = build_idr_replica(Path(root), shape=shape or (TEST_SHAPE if coordinate else DEMO_SHAPE),
                                    coordinate=coordinate)
        with ReplicaServer(replica.root) as server:
            replica.serve(server)
            yield RunningIdr(replica, server)


REPLICA = _IdrReplicaKind()
