"""Offline replica of the Light My Cells Seafile share (seafile.lirmm.fr, share 123f71e12bf24db59d84).

Like Seafile: ``/d/<share>/files/?p=%2FStudy_<n>.tar.gz&dl=1`` answers ``302`` to the file server
(``/seafhttp/files/<token>/Study_<n>.tar.gz``), which serves the tarball with HEAD, Range and
Content-Length; without ``dl=1`` the share answers an HTML page, an unknown file 404 [inferred
from how Seafile share links behave; the real redirect target was not observed]. The tarballs
hold ``Study_<n>/image_<id>_<BF|DIC|PC>_z<k>.ome.tiff`` inputs and
``image_<id>_<Organelle>.ome.tiff`` targets: single-plane OME-TIFFs (TCZYX, T = C = Z = 1)
written by tifffile, of different odd sizes and pixel sizes within a study, coordinate-encoded
so that any transpose or mix-up shows.

Studies served:

- 1 and 2: the contract cases (study 2 also holds a member that is not an image, which the
  fetch must list, and uses a pixel size in nm);
- 66 (``HOSTILE_DOTDOT``): a member ``../escaped.txt`` beside ordinary images;
- 67 (``HOSTILE_LINK``): a symbolic link member pointing at ``/etc/passwd``;
- 68 (``DAMAGED_OME``): an input whose OME-XML does not parse.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import io
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from emdata.testing.http_server import ReplicaServer
from emdata.testing.registry import ReplicaCase
from emdata.sources.lightmycells import share_file_url

SHARE = "123f71e12bf24db59d84"  # the real share token: only scheme, host and port change
HOSTILE_DOTDOT, HOSTILE_LINK, DAMAGED_OME = 66, 67, 68


@dataclass(frozen=True)
class ImageSpec:
    id: int
    shape: tuple[int, int]
    pixel: float  # size of a pixel in ``unit``
    unit: str
    inputs: dict[str, int]  # modality -> number of z planes
    targets: tuple[str, ...]
    dtype: str = "uint16"

    @property
    def pixel_nm(self) -> float:
        return self.pixel * {"µm": 1000.0, "nm": 1.0}[self.unit]


STUDIES: dict[int, list[ImageSpec]] = {
    1: [ImageSpec(3, (37, 53), 0.1625, "µm", {"BF": 3}, ("Nucleus", "Mitochondria", "Tubulin", "Actin")),
        ImageSpec(11, (45, 29), 0.325, "µm", {"BF": 2}, ("Mitochondria",)),
        ImageSpec(12, (31, 67), 0.1625, "µm", {"BF": 1}, ("Nucleus", "Actin"))],
    2: [ImageSpec(1, (41, 47), 108.3, "nm", {"PC": 2}, ("Tubulin", "Nucleus"), "uint8"),
        ImageSpec(2, (23, 59), 108.3, "nm", {"DIC": 1}, ("Actin",), "uint8")],
}
DEMO_SCALE = 8  # the demo's images are this many times larger (nicer thumbnails)


def image_array(study: int, spec: ImageSpec, kind: str, scale: int = 1) -> np.ndarray:
    """Coordinate-encoded 2D pixels, different for every file of the study."""
    h, w = spec.shape[0] * scale, spec.shape[1] * scale
    y, x = np.indices((h, w), dtype=np.int64)
    salt = int(hashlib.sha256(f"{study}/{spec.id}/{kind}".encode()).hexdigest()[:6], 16)
    info = np.iinfo(np.dtype(spec.dtype))
    if scale > 1:  # cell-like blobs for the demo's thumbnails: the same cells in every file of an image
        return (cells((h, w), seed=study * 1000 + spec.id, kind=kind) * int(info.max) * 0.8).astype(spec.dtype)
    value = y * 1_009 + x * 7 + (y * x) % 13 + salt
    return (value % (int(info.max) + 1)).astype(spec.dtype)


def cells(shape: tuple[int, int], seed: int, kind: str) -> np.ndarray:
    """Values in [0, 1]: round cells; inputs show their outlines, each target a different part."""
    rng = np.random.default_rng(seed)
    y, x = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape)
    radius = min(shape) / 9
    for _ in range(12):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        d = np.hypot(y - cy, x - cx) / radius
        if kind.startswith(("BF", "DIC", "PC")):
            out += np.exp(-((d - 1.0) ** 2) / 0.02) * 0.6 + np.exp(-d ** 2) * 0.2
        elif kind == "Nucleus":
            out += np.exp(-(d / 0.45) ** 4)
        elif kind == "Actin":
            out += np.exp(-((d - 0.95) ** 2) / 0.01)
        else:  # Mitochondria, Tubulin: speckles inside the cell
            out += (d < 0.9) * (np.sin(y / 3.0 + cx) * np.cos(x / 2.5 + cy) > 0.6) * 0.8
    noise = rng.normal(0, 0.03, shape)
    return np.clip(out / max(out.max(), 1e-9) + noise + 0.05, 0, 1)


def ome_tiff_bytes(array: np.ndarray, pixel: float, unit: str, channel: str) -> bytes:
    import tifffile

    buf = io.BytesIO()
    # A UUID from the content, not tifffile's random one, so two replica builds serve the same bytes.
    uuid = hashlib.sha256(array.tobytes() + channel.encode()).hexdigest()[:32]
    tifffile.imwrite(buf, array[None, None, None], ome=True, photometric="minisblack",
                     metadata={"UUID": f"urn:uuid:{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}",
                               "axes": "TCZYX", "PhysicalSizeX": pixel, "PhysicalSizeXUnit": unit,
                               "PhysicalSizeY": pixel, "PhysicalSizeYUnit": unit, "Channel": {"Name": [channel]}})
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_study(path: Path, study: int, specs: list[ImageSpec], *, scale: int = 1,
                extra: dict[str, bytes] | None = None, links: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """A gzip'd tarball as the share serves it; returns ``images/<id>/<path>`` -> pixels."""
    expected: dict[str, np.ndarray] = {}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for spec in specs:
            files = [(f"{m}_z{z}", f"inputs/{m}_z{z}", m) for m, n in spec.inputs.items() for z in range(n)]
            files += [(t, f"targets/{t}", t) for t in spec.targets]
            for suffix, role, channel in files:
                array = image_array(study, spec, suffix, scale)
                expected[f"images/{spec.id}/{role}"] = array
                _add(tar, f"Study_{study}/image_{spec.id}_{suffix}.ome.tiff",
                     ome_tiff_bytes(array, spec.pixel, spec.unit, channel))
        for name, data in (extra or {}).items():
            _add(tar, name, data)
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 1_700_000_000
            tar.addfile(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))
    return expected


def file_token(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:32]


def served_path(name: str) -> str:
    """The file server's URL path of a share file (what the share's ``dl=1`` redirects to)."""
    return f"/seafhttp/files/{file_token(name)}/{name}"


@dataclass
class LightMyCellsReplica:
    root: Path
    studies: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def add(self, study: int, specs: list[ImageSpec], **kwargs: Any) -> None:
        name = f"Study_{study}.tar.gz"
        self.studies[study] = write_study(self.root / served_path(name).lstrip("/"), study, specs, **kwargs)


def build_replica(root: Path, *, coordinate: bool = True) -> LightMyCellsReplica:
    replica = LightMyCellsReplica(Path(root))
    scale = 1 if coordinate else DEMO_SCALE
    replica.add(1, STUDIES[1], scale=scale)
    replica.add(2, STUDIES[2], scale=scale, extra={"Study_2/notes.txt": b"acquired on the same day\n"})
    small = [STUDIES[1][0]]
    replica.add(HOSTILE_DOTDOT, small, extra={"../escaped.txt": b"outside\n"})
    replica.add(HOSTILE_LINK, small, links={f"Study_{HOSTILE_LINK}/image_9_BF_z0.ome.tiff": "/etc/passwd"})
    replica.add(DAMAGED_OME, small)
    _damage_ome(replica.root / served_path(f"Study_{DAMAGED_OME}.tar.gz").lstrip("/"))
    return replica


def _damage_ome(path: Path) -> None:
    """Cut the OME-XML of the first input in half (same length: the TIFF stays readable)."""
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (member, data) in enumerate(members):
            if i == 0:
                start = data.index(b"<Image ")
                data = data[:start] + b"<Imag!" + data[start + 6:]
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))


def seafile_route(server: ReplicaServer):
    """``/d/<share>/files/?p=/<name>&dl=1`` -> 302 to the file server; the share page; 404."""

    def handle(match: Any, query: dict[str, list[str]]) -> tuple[Any, ...]:
        if match["share"] != SHARE:
            return 404, b"<html><body>Link does not exist.</body></html>", "text/html"
        name = (query.get("p") or ["/"])[0].lstrip("/")
        if match["rest"] == "" or not name:
            return 200, _share_page(server).encode(), "text/html; charset=utf-8"
        if server.local_path(served_path(name)) is None or "/" in name:
            return 404, b"<html><body>File does not exist.</body></html>", "text/html"
        if (query.get("dl") or ["0"])[0] == "1":
            return 302, b"", "text/html", {"Location": server.url + served_path(name)}
        return 200, f"<html><body><h1>{html.escape(name)}</h1></body></html>".encode(), "text/html"

    return handle


def _share_page(server: ReplicaServer) -> str:
    files = sorted(p.name for p in (server.root / "seafhttp" / "files").glob("*/*.tar.gz"))
    rows = "".join(f'<li><a href="/d/{SHARE}/files/?p=%2F{n}">{html.escape(n)}</a></li>' for n in files)
    return f"<html><head><title>Light My Cells</title></head><body><ul>{rows}</ul></body></html>"


def lightmycells_dataset(share_url: str, study: int) -> dict[str, Any]:
    return {"title": f"Light My Cells study {study} (replica)", "modality": "light microscopy (BF/PC/DIC)",
            "license": "not stated (replica)", "citation": "Light My Cells challenge, ISBI 2024 (replica data)",
            "source": {"kind": "lightmycells", "share_url": share_url, "study": {"file": f"Study_{study}.tar.gz"}}}


@dataclass
class RunningLightMyCells:
    replica: LightMyCellsReplica
    server: ReplicaServer

    @property
    def share_url(self) -> str:
        return f"{self.server.url}/d/{SHARE}/"

    def cases(self) -> list[ReplicaCase]:
        out = []
        for study in (1, 2):
            name = f"Study_{study}.tar.gz"
            resolutions = {role: (s.pixel_nm, s.pixel_nm) for s in STUDIES[study]
                           for role in self.replica.studies[study] if role.startswith(f"images/{s.id}/")}
            first = STUDIES[study][0].pixel_nm
            out.append(ReplicaCase(f"lightmycells_study_{study}", lightmycells_dataset(self.share_url, study),
                                   self.replica.studies[study], (1.0, first, first), (0.0, 0.0, 0.0),
                                   fault_path=served_path(name), resolutions=resolutions))
        return out

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """Point a study at the replica's share; studies the replica lacks map to study 1 or 2."""
        out = {**dataset, "source": dict(dataset["source"])}
        study = dict(out["source"]["study"])
        number = int(study["file"].split("_")[1].split(".")[0])
        if number not in (1, 2):
            number = 1 + number % 2
        out["source"]["share_url"] = self.share_url
        out["source"]["study"] = {"file": f"Study_{number}.tar.gz"}
        return out

    def url(self, study: int) -> str:
        return share_file_url(self.share_url, f"Study_{study}.tar.gz")


class _LightMyCellsKind:
    kind = "lightmycells"
    transport = "http"
    case_keys = ("lightmycells_study_1", "lightmycells_study_2")

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True) -> Iterator[RunningLightMyCells]:
        replica = build_replica(Path(root), coordinate=coordinate)
        with ReplicaServer(replica.root) as server:
            server.route(r"/d/(?P<share>[^/]+)/(?P<rest>(files/)?)", seafile_route(server))
            yield RunningLightMyCells(replica, server)


REPLICA = _LightMyCellsKind()
