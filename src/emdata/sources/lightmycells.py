"""Light My Cells (ISBI 2024 challenge): transmitted-light inputs and fluorescence targets.

A collection, not a volume: each study is a tarball on the organisers' public Seafile share
(``<share>/files/?p=%2FStudy_<n>.tar.gz&dl=1``; Seafile answers with a redirect to its file
server, which honours Range). One dataset per study, so each study is its own DVC stage. The
tarball is downloaded through the shared HTTP layer (resume, retries, size and sha256 recorded in
``extra["sources"]``), then extracted by streaming (:mod:`emdata.transport.archive`: no absolute names,
no ``..``, no links or devices, per-member and total caps) and deleted; only members named like

- inputs ``image_<id>_<BF|DIC|PC>_z<k>.ome.tiff`` (one file per focal plane), and
- targets ``image_<id>_<Nucleus|Mitochondria|Tubulin|Actin>.ome.tiff`` (not every image has all four)

are kept (with or without the archive's ``Study_<n>/`` folder); any other member is listed in the
fetch record (``extra["skipped"]``). Every file is a single-plane OME-TIFF (TCZYX, T = C = Z = 1);
pixel sizes come from its OME-XML (:mod:`emdata.formats.ometiff`), and image sizes differ within a study.

HDF5: ``/images/<id>/inputs/<modality>_z<k>`` and ``/images/<id>/targets/<organelle>``, 2D, with
a per-image ``/table`` (id, modality, z planes, shape, pixel size, which targets exist).

Cite the challenge: Light My Cells, France-BioImaging, ISBI 2024
(https://lightmycells.grand-challenge.org). The licence of the training data is not stated in
the files (SOURCES.md §6).

params.yaml::

    source:
      kind: lightmycells
      share_url: https://seafile.lirmm.fr/d/123f71e12bf24db59d84/
      study: {file: Study_3.tar.gz, size: null, sha256: null}
      limits: {member_mb: 2048, total_gb: 512}   # optional caps on what extraction may write
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import FormatError
from emdata.formats.ometiff import open_plane, read_ome
from emdata.h5.collection import CollectionItem, RawCollection
from emdata.params.schema import Section, as_int_range, as_matching, param, read_params
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.files import FilePlan, RemoteFile, as_remote_file, fetch_files, plan_files
from emdata.sources.fetch.record import FetchedFile, FetchRecord
from emdata.transport.archive import ArchiveDamaged, Limits, extract_tar

KIND = "lightmycells"
LAYOUT = "collection"
READERS = ("emdata.formats.ometiff", "emdata.formats.tiff")  # code that decides the normalized bytes
FETCHERS = ("emdata.transport.archive",)  # code that decides the fetched bytes (extraction)

ARCHIVE = re.compile(r"Study_(?P<study>[1-9][0-9]*)\.tar\.gz")
SHARE = re.compile(r"https?://[^/]+/d/[0-9a-f]+/")
INPUT = re.compile(r"image_(?P<id>[0-9]+)_(?P<modality>BF|DIC|PC)_z(?P<z>[0-9]+)\.ome\.tiff?")
TARGET = re.compile(r"image_(?P<id>[0-9]+)_(?P<organelle>Nucleus|Mitochondria|Tubulin|Actin)\.ome\.tiff?")
MODALITIES = ("BF", "DIC", "PC")
ORGANELLES = ("Nucleus", "Mitochondria", "Tubulin", "Actin")
MIB, GIB = 1 << 20, 1 << 30


def share_file_url(share_url: str, name: str) -> str:
    """The download URL of a file at the root of a public Seafile share (``?p=%2F<name>&dl=1``)."""
    return f"{share_url}files/?p={urllib.parse.quote('/' + name, safe='')}&dl=1"


def _on_share(got: dict[str, Any]) -> Any:
    """The study's tarball, served by the share read before it."""
    return as_remote_file(partial(share_file_url, got["share_url"]),
                          as_matching(ARCHIVE, "a study archive named Study_<n>.tar.gz"))


@dataclass(frozen=True)
class Params:
    share_url: str = param(as_matching(SHARE, "a Seafile share URL like https://seafile.lirmm.fr/d/<token>/"))
    study: RemoteFile = param(using=_on_share)  # the study's tarball on the share
    # extraction caps: no file of a study should come near these
    member_mb: int = param(as_int_range(1, 1 << 24), 2048, key="limits.member_mb")
    total_gb: int = param(as_int_range(1, 1 << 20), 512, key="limits.total_gb")

    @property
    def number(self) -> int:
        match = ARCHIVE.fullmatch(self.study.name)
        assert match is not None  # checked by parse_params
        return int(match["study"])

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "share_url": self.share_url, "study": self.study.to_dict(),
                "limits": {"member_mb": self.member_mb, "total_gb": self.total_gb}}


def parse_params(sec: Section) -> Params:
    return read_params(Params, sec)


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    return plan_files(ctx, [params.study])


def accepted_name(member: str, study: int) -> str | None:
    """Where an archive member goes in the raw folder (its file name), or None if it is not an image."""
    parts = member.split("/")
    if len(parts) == 2 and parts[0] == f"Study_{study}":
        parts = parts[1:]
    if len(parts) != 1:
        return None
    name = parts[0]
    return name if INPUT.fullmatch(name) or TARGET.fullmatch(name) else None


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    spec = params.study
    _clear_extracted(ctx.dest, keep=spec.name)  # an earlier extraction of this spec may have stopped midway
    downloaded = fetch_files(ctx, [spec])[spec.name]
    archive = ctx.dest / spec.name
    limits = Limits(member_bytes=params.member_mb * MIB, total_bytes=params.total_gb * GIB)
    try:
        extracted = extract_tar(archive, ctx.path, dataset=ctx.dataset, url=spec.url, limits=limits,
                                accept=lambda name: accepted_name(name, params.number))
    except ArchiveDamaged:
        archive.unlink(missing_ok=True)  # damaged bytes must not be reused: the next run downloads again
        raise
    if not any(INPUT.fullmatch(name) or TARGET.fullmatch(name) for name in extracted.files):
        raise FormatError(ctx.dataset, spec.url, f"the archive holds no image named like "
                          f"image_<id>_<BF|DIC|PC>_z<k>.ome.tiff ({extracted.members} members, "
                          f"{len(extracted.skipped)} others)", "check the study number in params.yaml")
    archive.unlink()  # the extracted files are the raw data; the archive's size and sha256 stay in the record
    files = {name: FetchedFile(f"{spec.url}#{name}", size, digest)
             for name, (size, digest) in sorted(extracted.files.items())}
    extra = {"sources": [{"url": spec.url, "file": spec.name, "size": downloaded.size, "sha256": downloaded.sha256,
                          "members": extracted.members}],
             "skipped": extracted.skipped}
    return ctx.record(files, extra)


def _clear_extracted(folder: Path, keep: str) -> None:
    """Remove what an interrupted extraction left; keep the archive (or its resumable .part)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(keep) or entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# -- reading the fetched study -------------------------------------------------------------------


def _image_files(raw: Path) -> list[str]:
    record = FetchRecord.load(raw)
    names = sorted(record.files) if record is not None else sorted(p.name for p in raw.iterdir())
    return [n for n in names if INPUT.fullmatch(n) or TARGET.fullmatch(n)]


def open_collection(params: Params, raw: Path, dataset: str) -> RawCollection:
    images: dict[str, dict[str, Any]] = {}
    for name in _image_files(raw):
        info = read_ome(raw / name, dataset)
        if (m := INPUT.fullmatch(name)) is not None:
            image, path = m["id"], f"inputs/{m['modality']}_z{int(m['z'])}"
            attrs = {"modality": m["modality"], "z": int(m["z"])}
        else:
            m = TARGET.fullmatch(name)
            assert m is not None
            image, path = m["id"], f"targets/{m['organelle']}"
            attrs = {"organelle": m["organelle"]}
        entry = images.setdefault(image, {"items": [], "shape": info.shape, "first": name})
        if info.shape != entry["shape"]:
            raise FormatError(dataset, str(raw / name), f"is {info.shape[0]} x {info.shape[1]} but "
                              f"{entry['first']} of the same image is {entry['shape'][0]} x {entry['shape'][1]}",
                              "inputs and targets of one image must be aligned; the file may be damaged")
        attrs.update({"file": name, "channels": list(info.channels), "ome_dimension_order": info.dimension_order})
        entry["items"].append(CollectionItem(
            image=image, path=path, open=partial(open_plane, raw / name, dataset), shape=info.shape,
            dtype=np.dtype(info.dtype), axes="yx", pixel_size_nm=info.pixel_size_nm, attrs=attrs, source=str(raw / name)))
    items, table = [], []
    for image in sorted(images, key=int):
        entry = images[image]
        mine = sorted(entry["items"], key=_item_order)
        items += mine
        inputs = [i for i in mine if i.path.startswith("inputs/")]
        targets = [i.attrs["organelle"] for i in mine if i.path.startswith("targets/")]
        modalities = sorted({i.attrs["modality"] for i in inputs}, key=MODALITIES.index)
        row: dict[str, Any] = {
            "image": image, "modality": "+".join(modalities), "z_planes": len(inputs),
            "z": " ".join(str(i.attrs["z"]) for i in inputs), "height": entry["shape"][0],
            "width": entry["shape"][1], "dtype": str(mine[0].dtype), "targets": " ".join(targets),
        }
        row.update({f"has_{o}": o in targets for o in ORGANELLES})
        table.append(row)
    return RawCollection(dataset, items, table)


def _item_order(item: Any) -> tuple[int, int, int]:
    if item.path.startswith("inputs/"):
        return (0, MODALITIES.index(item.attrs["modality"]), item.attrs["z"])
    return (1, ORGANELLES.index(item.attrs["organelle"]), 0)


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """Counts per kind of file and one parsed OME-XML example of each (the rest are alike)."""
    record = FetchRecord.load(raw)
    kinds: dict[str, dict[str, Any]] = {}
    for name in _image_files(raw):
        m = INPUT.fullmatch(name)
        kind = f"input {m['modality']}" if m else f"target {TARGET.fullmatch(name)['organelle']}"  # type: ignore[index]
        entry = kinds.setdefault(kind, {"files": 0})
        entry["files"] += 1
        if "example" not in entry:
            entry["example"] = {"file": name, **read_ome(raw / name, dataset).to_dict()}
    return {"study": params.number, "files": dict(sorted(kinds.items())),
            "skipped": (record.extra.get("skipped") if record else None) or []}
