"""Offline replica of the organoid tracking set as a user receives it: a folder and a zip.

There is no service to mimic (the authors send the data by e-mail, SOURCES.md §7), so the replica
writes what the README describes: ``Organoid/Tracking/<well>/Proj_<t>.tif`` + ``Proj_<t>.json``
(labelme 4.5.6 and 4.5.7, rectangles with corner points in either order, identities that persist
across frames, ``imageData`` base64 in one well and null in the others) and
``Organoid/Detection/<well>/Proj_1.*``, plus a zip of the same tree. Frames are greyscale uint16
TIFFs with their pixel size in centimetre resolution tags; one well has a frame smaller than the
others (stitched montages differ in size), coordinate-encoded for the contract.

The expected masks are computed here independently of the source's rasterizer: a box covers the
pixels it overlaps (``floor(x0)..ceil(x1)``), larger boxes painted first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from emdata.testing.registry import ReplicaCase

PIXEL_UM = 1.61  # written as centimetre resolution tags
BOX_DTYPE = np.dtype([("t", "<i4"), ("identity", "<i8"), ("x0", "<f8"), ("y0", "<f8"), ("x1", "<f8"), ("y1", "<f8")])


@dataclass(frozen=True)
class WellSpec:
    subset: str
    name: str
    shapes: tuple[tuple[int, int], ...]  # one per frame (Proj_1, Proj_2, ...)
    organoids: int
    version: str = "4.5.6"
    embed: bool = False  # imageData as base64 (else null)


WELLS = (
    WellSpec("Tracking", "W_E4_12", ((37, 53), (35, 53), (37, 53)), organoids=3, embed=True),
    WellSpec("Tracking", "W_F10_3", ((41, 29), (41, 29)), organoids=2, version="4.5.7"),
    WellSpec("Detection", "W_C10_0", ((33, 45),), organoids=4),
)
DEMO_SCALE = 9


def frame_array(spec: WellSpec, t: int, shape: tuple[int, int], scale: int) -> np.ndarray:
    y, x = np.indices(shape, dtype=np.int64)
    salt = int(hashlib.sha256(f"{spec.name}/{t}".encode()).hexdigest()[:4], 16)
    if scale == 1:
        return ((y * 1_009 + x * 7 + (x * y) % 13 + salt) % 65536).astype(np.uint16)
    value = 30000 + 2000 * np.sin(y / 23.0) * np.cos(x / 31.0) + (salt % 500)
    for _, x0, y0, x1, y1 in boxes_for(spec, t, shape, scale):  # a dark, round organoid in every box
        cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
        value = value - 18000 * np.exp(-inside ** 2)
    return value.astype(np.uint16)


def boxes_for(spec: WellSpec, t: int, shape: tuple[int, int], scale: int) -> list[tuple[int, float, float, float, float]]:
    """(identity, x0, y0, x1, y1): organoids drift a little each day and stay inside the frame."""
    h, w = shape
    out = []
    for k in range(spec.organoids):
        bw, bh = (5 + 3 * k) * scale + 0.5, (4 + 2 * k) * scale
        x0 = min(w - bw, (2 + 9 * k) * scale + 1.5 * t)
        y0 = min(h - bh, (3 + 7 * k) * scale + 1.0 * t)
        out.append((k, float(x0), float(y0), float(x0 + bw), float(y0 + bh)))
    return out


def expected_masks(shape: tuple[int, int, int], frames: list[list[tuple[int, float, float, float, float]]],
                   sizes: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(shape, np.uint16)
    for i, boxes in enumerate(frames):
        h, w = sizes[i]
        for identity, x0, y0, x1, y1 in sorted(boxes, key=lambda b: (-(b[3] - b[1]) * (b[4] - b[2]), b[0])):
            mask[i, int(np.floor(y0)):min(h, int(np.ceil(y1))), int(np.floor(x0)):min(w, int(np.ceil(x1)))] = \
                identity + 1
    return mask


def _tiff_bytes(array: np.ndarray) -> bytes:
    import io

    import tifffile

    buf = io.BytesIO()
    per_cm = 1e4 / PIXEL_UM
    tifffile.imwrite(buf, array, photometric="minisblack", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return buf.getvalue()


def _labelme(spec: WellSpec, t: int, tif: bytes, shape: tuple[int, int],
             boxes: list[tuple[int, float, float, float, float]]) -> str:
    shapes = []
    for identity, x0, y0, x1, y1 in boxes:
        points = [[x1, y1], [x0, y0]] if identity % 2 else [[x0, y0], [x1, y1]]  # either corner first
        shapes.append({"label": str(identity), "line_color": None, "fill_color": None, "points": points,
                       "shape_type": "rectangle", "flags": {}})
    doc = {"version": spec.version, "flags": {}, "shapes": shapes, "imagePath": f"Proj_{t}.tif",
           "imageData": base64.b64encode(tif).decode() if spec.embed else None,
           "imageHeight": shape[0], "imageWidth": shape[1]}
    return json.dumps(doc, indent=2)


@dataclass
class OrganoidReplica:
    root: Path  # holds Organoid/ and organoid.zip
    expected: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # subset -> path -> array

    @property
    def folder(self) -> Path:
        return self.root / "Organoid"

    @property
    def zip(self) -> Path:
        return self.root / "organoid.zip"

    def tif(self, subset: str, well: str, t: int) -> Path:
        return self.folder / subset / well / f"Proj_{t}.tif"


def build_replica(root: Path, *, coordinate: bool = True) -> OrganoidReplica:
    replica = OrganoidReplica(Path(root))
    scale = 1 if coordinate else DEMO_SCALE
    for spec in WELLS:
        sizes = [(h * scale, w * scale) for h, w in spec.shapes]
        folder = replica.folder / spec.subset / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        frames, all_boxes, rows = [], [], []
        for t, shape in enumerate(sizes, start=1):
            array = frame_array(spec, t, shape, scale)
            tif = _tiff_bytes(array)
            boxes = boxes_for(spec, t, shape, scale)
            (folder / f"Proj_{t}.tif").write_bytes(tif)
            (folder / f"Proj_{t}.json").write_text(_labelme(spec, t, tif, shape, boxes))
            frames.append(array)
            all_boxes.append(boxes)
            rows += [(t, *b) for b in boxes]
        full = (len(sizes), max(h for h, _ in sizes), max(w for _, w in sizes))
        raw = np.zeros(full, np.uint16)
        for i, array in enumerate(frames):
            raw[i, :array.shape[0], :array.shape[1]] = array
        out = replica.expected.setdefault(spec.subset, {})
        out[f"images/{spec.name}/raw"] = raw
        out[f"images/{spec.name}/labels/organoids"] = expected_masks(full, all_boxes, sizes)
        out[f"images/{spec.name}/annotations/boxes"] = np.array(sorted(rows, key=lambda r: (r[0], r[1])), BOX_DTYPE)
    (replica.folder / "Tracking" / "README.txt").write_text("not an image: listed as skipped\n")
    with zipfile.ZipFile(replica.zip, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(replica.folder.rglob("*")):
            zf.write(path, path.relative_to(replica.root).as_posix())
    return replica


class LocalFiles:
    """What a local import has instead of a server: no requests to log, nothing to inject."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[Any] = []
        self.url = root.as_uri()

    def clear_log(self) -> None:
        self.requests.clear()

    def reset(self) -> None:
        self.clear_log()

    def local_path(self, path: str) -> Path | None:
        candidate = Path(path)
        return candidate if candidate.exists() else None


def organoid_dataset(path: Path, subset: str, masks: bool = True) -> dict[str, Any]:
    return {"title": f"Organoid tracking, {subset} wells (replica)", "modality": "bright-field montage (replica)",
            "license": "free for non-commercial research use",
            "citation": "High-throughput Organoid Tracking Dataset (replica data)",
            "source": {"kind": "labelme_tracking", "path": str(path), "subset": subset, "masks": masks}}


@dataclass
class RunningOrganoids:
    replica: OrganoidReplica
    server: LocalFiles

    def cases(self) -> list[ReplicaCase]:
        pixel = PIXEL_UM * 1000
        out = []
        for key, path, subset, masks in (("organoid_tracking", self.replica.folder, "Tracking", True),
                                         ("organoid_detection_zip", self.replica.zip, "Detection", False)):
            expected = {k: v for k, v in self.replica.expected[subset].items() if masks or "/labels/" not in k}
            resolutions = {k: (pixel, pixel) for k in expected if not k.endswith("/boxes")}
            well = next(s.name for s in WELLS if s.subset == subset)
            fault = self.replica.tif(subset, well, 1)
            out.append(ReplicaCase(key, organoid_dataset(path, subset, masks), expected, (1.0, pixel, pixel),
                                   (0.0, 0.0, 0.0), fault_path=str(path if path.suffix == ".zip" else fault),
                                   resolutions=resolutions))
        return out

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """Point an entry at the replica's folder (or zip, if the entry names a zip); drop a pin."""
        out = {**dataset, "source": {k: v for k, v in dataset["source"].items() if k != "sha256"}}
        src = out["source"]
        src["path"] = str(self.replica.zip if str(src["path"]).endswith(".zip") else self.replica.folder)
        src.pop("wells", None)
        return out


class _OrganoidKind:
    kind = "labelme_tracking"
    transport = "local"
    case_keys = ("organoid_tracking", "organoid_detection_zip")

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True) -> Iterator[RunningOrganoids]:
        replica = build_replica(Path(root), coordinate=coordinate)
        yield RunningOrganoids(replica, LocalFiles(replica.root))


REPLICA = _OrganoidKind()
