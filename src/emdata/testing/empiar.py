"""Offline replica of EMPIAR-11759: the EMPIAR REST API and the EBI HTTPS mirror of its files.

One loopback server answers both real paths:

- ``/empiar/api/entry/EMPIAR-11759/`` (and ``/empiar/api/entry/11759/``): the entry JSON in the
  real shape (top-level key the accession; ``image_width``/``image_height`` strings,
  ``pixel_width`` in Å, ``num_images_or_tilt_series`` an int);
- ``/empiar/world_availability/11759/data/``: an Apache-style listing with the DM3 slices, one
  XML file and a nested ``trakem2/`` tree; HEAD, Range and the server's faults as for any file.

The DM3 files come from :mod:`emdata.testing.dm3` with the structure of the real slice 0000
(``shared/reference/empiar_11759_slice_0000_dm3_tags.json``): an RGBA thumbnail as
``ImageList.0`` whose size varies per file, the uint8 image as ``ImageList.1`` (``Dimensions.0``
the width), calibrations in µm, ``SBFSEM.Record.Slice thickness`` 50 and ``SBFSEM.Approach.Slice
thickness`` 200, acquisition times per slice. Switches: ``hide(name)`` leaves a file out of the
listing (still served), ``api_changes`` edits the imageset the API describes, ``api_html`` makes
the API answer an HTML page.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from emdata.errors import EmdataError
from emdata.testing.dm3 import Typed, dm3_bytes, image_entry, rgba_thumbnail
from emdata.testing.http_server import ReplicaServer
from emdata.testing.registry import ReplicaCase
from emdata.testing.volumes import coordinate_volume, em_like_volume

ACCESSION = "EMPIAR-11759"
DATA_PATH = "/empiar/world_availability/11759/data/"
API_PATH = f"/empiar/api/entry/{ACCESSION}/"
NAME = "F57-8_test1_3VBSED_slice_{:04d}.dm3"
XML_NAME = "F57-8_test1.xml"  # the real folder holds one XML file; its name is not known here
PIXEL_UM = float(np.float32(0.007998250424861908))  # the real calibration (float32, µm)
PIXEL_NM = PIXEL_UM * 1000.0
SLICE_NM = 50.0
TEST_SHAPE = (11, 45, 37)
DEMO_SHAPE = (16, 230, 229)


def slice_tags(image: np.ndarray, index: int, *, slice_nm: float = SLICE_NM, pixel_um: float = PIXEL_UM,
               name_format: str = NAME) -> dict[str, Any]:
    """The root tag group of one slice, shaped like the real slice 0000 (a representative subset)."""
    height, width = image.shape
    thumb = rgba_thumbnail(image, (7 + index % 5, 9 + index % 3))  # the thumbnail's size varies per file
    minute, second = divmod(16 + 54 * index, 60)
    stem = name_format.format(index).rsplit(".", 1)[0].split("_", 2)[-1]
    tags = {
        "BSE Detector": {"Bright": 3.5294117647058822, "Contrast": 9.988333707776206},
        "DataBar": {"Acquisition Date": "11.06.2018", "Acquisition Time": f"22:{27 + minute:02d}:{second:02d}",
                    "Acquisition Time (OS)": 1.3173222436078186e17 + index * 2.7e9, "Device Name": "DigiScan",
                    "Exposure Number": 897131 + index, "Signal Name": "3VBSED"},
        "DigiScan": {"Image Height": Typed(5, height), "Image Width": Typed(5, width), "Sample Time": 0.5},
        "GMS Version": {"Created": "3.21.1374.0", "Saved": "3.21.1374.0"},
        "Meta Data": {"Dimension info": {"2": {"Origin": 0.0, "Scale": slice_nm, "Units": "nm"}},
                      "Format": "Image", "Signal": "DigiScan"},
        "Microscope Info": {"Emission Current (µA)": 0.0, "Field of View (µm)": pixel_um * width,
                            "Formatted Indicated Mag": "2.2kx", "Formatted Voltage": "1.9kV",
                            "Illumination Mode": "SEM", "Indicated Magnification": 2159.0, "Name": "FEI Quanta",
                            "Operation Mode": "SCANNING", "Voltage": 1900.0},
        "SBFSEM": {"Approach": {"Cut speed": 200.0, "Slice number": Typed(5, 100), "Slice thickness": 200.0},
                   "Imaging": {"Record pixel size": 8.0, "Record scan height": Typed(5, height),
                               "Record scan width": Typed(5, width)},
                   "Record": {"Base file name": "C:\\Users\\Michaela\\F57\\F57-8\\test1\\F57-8_test1",
                              "Cut speed": 100.0, "Slice number": Typed(5, 250), "Slice thickness": slice_nm}},
        "Session Info": {"Detector": "3VBSED", "Microscope": "", "Operator": "", "Specimen": ""},
    }
    return {
        "DocumentObjectList": [{"AnnotationType": 20, "ImageDisplayType": 1, "UniqueID": 8}],
        "HasWindowPosition": True,
        "ImageList": [
            image_entry(thumb, scale=1.0, units="", name=f"Image Of {stem}", uid=2 * index,
                        tags={"GMS Version": {"Created": "3.21.1374.0"}}),
            image_entry(image, scale=pixel_um, units="µm", name=stem, uid=2 * index + 1, tags=tags,
                        description="pixel size : \u20280.0080µm x 0.0080µm\u2028"),
        ],
        "ImageSourceList": [{"ClassName": "ImageSource:Simple", "Id": [0], "ImageRef": 1}],
        "InImageMode": True,
        "LayoutType": "Unknown",
        "NextDocumentObjectID": 11,
        "Thumbnails": [{"ImageIndex": 0}],
    }


def write_slice(path: Path, image: np.ndarray, index: int, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dm3_bytes(slice_tags(image, index, **options)))
    return path


def entry_json(shape: tuple[int, int, int], *, count: int | None = None, pixel_angstrom: float = 80.0,
               changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The API answer in the real shape (values the real entry has or probably has)."""
    n, height, width = shape
    imageset = {"name": "SBF-SEM of a 55 hpf zebrafish retina (replica)", "directory": "data",
                "category": "reconstructed volumes", "header_format": "DM3", "data_format": "DM3",
                "num_images_or_tilt_series": n if count is None else count, "frames_per_image": 1,
                "voxel_type": "UNSIGNED BYTE", "image_width": str(width), "image_height": str(height),
                "pixel_width": pixel_angstrom, "pixel_height": pixel_angstrom, "details": "",
                "micrographs_file_pattern": "data/F57-8_test1_3VBSED_slice_*.dm3",
                "picked_particles_directory": None, "picked_particles_file_pattern": None}
    imageset.update(changes or {})
    return {ACCESSION: {
        "title": "SBF-SEM of the developing zebrafish retina (replica)", "status": "REL",
        "entry_doi": "10.6019/EMPIAR-11759", "experiment_type": "SBF-SEM", "deposition_date": "2023-10-02",
        "release_date": "2023-11-20", "update_date": "2023-11-20", "dataset_size": "1.2 GB", "scale": "",
        "cross_references": [], "related_pdb_entries": [],
        "citation": [{"title": "(replica) a study of the developing zebrafish retina", "journal": "replica",
                      "year": 2023, "doi": "10.0000/replica.11759", "pubmedid": None}],
        "principal_investigator": [{"first_name": "A", "last_name": "Replica"}],
        "corresponding_author": {"first_name": "A", "last_name": "Replica"},
        "imagesets": [imageset],
    }}


@dataclass
class EmpiarReplica:
    root: Path
    shape: tuple[int, int, int]
    names: list[str] = field(default_factory=list)
    volume: np.ndarray | None = None  # kept for small replicas (the expected /raw)

    @property
    def folder(self) -> Path:
        return self.root / DATA_PATH.strip("/")


def build_empiar_replica(root: Path, *, shape: tuple[int, int, int] = TEST_SHAPE, coordinate: bool = True,
                         name_format: str = NAME, make_slice: Callable[[int], np.ndarray] | None = None,
                         keep: bool = True, slice_nm: float = SLICE_NM) -> EmpiarReplica:
    """Write the slices, the XML and a small ``trakem2/`` tree under ``root``, one slice at a time."""
    replica = EmpiarReplica(Path(root), tuple(shape))  # type: ignore[arg-type]
    if make_slice is None:
        whole = coordinate_volume(shape) if coordinate else em_like_volume(shape)
        make_slice = whole.__getitem__
    kept = []
    for z in range(shape[0]):
        image = np.ascontiguousarray(make_slice(z), dtype=np.uint8)
        name = name_format.format(z)
        write_slice(replica.folder / name, image, z, name_format=name_format, slice_nm=slice_nm)
        replica.names.append(name)
        if keep:
            kept.append(image)
    replica.volume = np.stack(kept) if keep else None
    (replica.folder / XML_NAME).write_text('<?xml version="1.0"?>\n<trakem2 replica="yes"/>\n')
    for rel in ("trakem2/trakem2.1528744716.1/trakem2.masks/mask.0.zip", "trakem2/trakem2.1528744716.1/notes.txt"):
        (replica.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (replica.folder / rel).write_bytes(b"replica\n")
    return replica


def empiar_dataset(server_url: str, **source: Any) -> dict[str, Any]:
    """The params.yaml entry for EMPIAR-11759, pointed at a replica server."""
    return {
        "title": "EMPIAR-11759, SBF-SEM of the developing zebrafish retina (replica)",
        "modality": "SBF-SEM", "license": "CC0 1.0", "citation": "EMPIAR-11759 (replica data)",
        "accession": ACCESSION, "doi": "10.6019/EMPIAR-11759",
        "source": {"kind": "empiar", "accession": ACCESSION, "api_url": server_url + API_PATH,
                   "base_url": server_url + DATA_PATH, "imageset": "data", "pattern": "*.dm3",
                   "extra_files": ["*.xml"], **source},
    }


@dataclass
class RunningEmpiar:
    replica: EmpiarReplica
    server: ReplicaServer
    api_changes: dict[str, Any] = field(default_factory=dict)  # edits to the imageset the API describes
    api_html: bool = False  # the API answers an HTML page (a maintenance page, a login wall)

    def __post_init__(self) -> None:
        self.server.route(r"/empiar/api/entry/(?:EMPIAR-)?11759/?", self._api)

    def _api(self, match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        if self.api_html:
            return 200, b"<!DOCTYPE html><html><head><title>EMPIAR</title></head><body>Down for maintenance" \
                        b"</body></html>\n", "text/html"
        body = entry_json(self.replica.shape, changes=self.api_changes)
        return 200, json.dumps(body).encode(), "application/json"

    def url_path(self, name: str) -> str:
        return DATA_PATH + name

    def hide(self, name: str) -> None:
        """Leave ``name`` out of the listing; it is still served (as one EBI backend did)."""
        self.server.hide(self.url_path(name))

    def cases(self) -> list[ReplicaCase]:
        names = self.replica.names
        files = {n: self.url_path(n) for n in [*names, XML_NAME]}
        return [ReplicaCase(
            "empiar_11759", empiar_dataset(self.server.url), {"raw": self.replica.volume},
            (SLICE_NM, PIXEL_NM, PIXEL_NM), (0.0, 0.0, 0.0), fault_path=self.url_path(names[len(names) // 2]),
            files=files, pin_size=pin_size)]

    def point(self, key: str, dataset: dict[str, Any]) -> dict[str, Any]:
        """Point an EMPIAR-11759 entry at the replica; drop pins (the replica files are smaller)."""
        source = dict(dataset["source"])
        if source.get("accession") != ACCESSION:
            raise EmdataError(f"demo: {key}: the EMPIAR replica serves {ACCESSION} only, not {source.get('accession')!r}")
        source.pop("pins", None)
        source["api_url"] = self.server.url + API_PATH
        source["base_url"] = self.server.url + DATA_PATH
        return {**dataset, "source": source}


def pin_size(entry: dict[str, Any], relpath: str, size: int) -> None:
    """Pin a file's size in an EMPIAR params entry (``source.pins``), for the contract's size tests."""
    entry["source"].setdefault("pins", {}).setdefault(relpath, {})["size"] = size


class _EmpiarReplicaKind:
    kind = "empiar"
    transport = "http"
    case_keys = ("empiar_11759",)

    @contextmanager
    def start(self, root: Path, *, coordinate: bool = True) -> Iterator[RunningEmpiar]:
        """Coordinate-encoded small slices for tests; larger EM-like ones (nicer thumbnails) for the demo."""
        shape = TEST_SHAPE if coordinate else DEMO_SHAPE
        replica = build_empiar_replica(Path(root), shape=shape, coordinate=coordinate)
        with ReplicaServer(replica.root) as server:
            yield RunningEmpiar(replica, server)


REPLICA = _EmpiarReplicaKind()
