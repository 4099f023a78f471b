"""High-throughput organoid tracking set: per-well daily montages with labelme identity boxes.

Not downloadable (the authors send it by e-mail; SOURCES.md §7), so this kind imports a folder or
a zip the user has, given by an absolute ``path``: ``[Organoid/]Tracking/<well>/Proj_<t>.tif`` with
its labelme ``Proj_<t>.json`` (and ``Detection/<well>/Proj_1.*``). ``plan`` lists the files and
bytes, ``fetch`` copies the chosen subset into ``data/raw/<ds>/<well>/`` (files, bytes and sha256
recorded; symbolic links, ``..`` and absolute zip members refused), checking every labelme file
(:mod:`emdata.formats.labelme`) and that each has its TIF. A later ``fetch`` sees changed, added or
removed files (``input_stamp``; the pipeline's ``inputs`` stage writes the same stamp to
``data/inputs/<ds>.json``, so ``dvc repro`` re-runs ``fetch@<ds>`` too) and imports again; ``sha256`` in params can pin the zip's bytes
or the folder's manifest digest (what ``emdata plan`` prints), so that the params change with the data.

Each well is one image of the collection:

- ``/images/<well>/raw``: (T, Y, X), the frames ``Proj_1..Proj_n`` in order, attributes
  ``time_spacing`` 24 (``time_unit`` h; one image per well every 24 h) and ``t`` (the Proj numbers);
  frames of different sizes are padded with 0 at the bottom and right to the largest (``frames`` table);
- ``/images/<well>/annotations/boxes``: (t, identity, x0, y0, x1, y1) in pixels of the frame;
- ``/images/<well>/labels/organoids`` (``masks: true``): (T, Y, X) instance masks rasterized from
  the boxes, value = identity + 1 (0 is background; identities start at 0), a pixel belonging to
  every box it overlaps, smaller boxes painted over larger ones.

The TIFFs are ~9,000 x 9,000 montages: frames are read as boxes (tiles), never a series at once.
Pixel size: from the TIFF's resolution tags when they are in centimetres (or ImageJ's micron
unit), else params.yaml's ``voxel_size_nm`` (its y and x). Licence: free for non-commercial
research use. Cite: High-throughput Organoid Tracking Dataset (github.com/541435721/Orga-DATA).

params.yaml::

    source:
      kind: labelme_tracking
      path: /data/orga-data/Organoid       # a folder, or a .zip of it
      subset: Tracking                     # or Detection
      wells: null                          # optional list of well names; default all
      masks: true
      sha256: null                         # optional pin (zip bytes or folder manifest digest)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emdata.core.geometry import same_geometry
from emdata.errors import FormatError, IntegrityError
from emdata.formats.labelme import Annotation, BoxMasks, load
from emdata.formats.tiff import TiffStack
from emdata.formats.tiffseries import TiffSeries, pixel_size_nm
from emdata.h5.collection import CollectionItem, RawCollection
from emdata.params.schema import (
    Section,
    as_bool,
    as_choice,
    as_sha256,
    as_str,
    as_str_list,
    config_error,
    param,
    read_params,
)
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.files import FilePlan
from emdata.sources.fetch.local import LocalFile, LocalTree
from emdata.sources.fetch.record import FetchRecord

KIND = "labelme_tracking"
LAYOUT = "collection"
READERS = ("emdata.formats.labelme", "emdata.formats.tiff", "emdata.formats.tiffseries")
FETCHERS = ("emdata.transport.archive", "emdata.sources.fetch.local")  # zip member checks, the copy
SUBSETS = ("Tracking", "Detection")
WELL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FRAME = re.compile(r"Proj_(?P<t>[0-9]{1,6})\.(?P<ext>tif|tiff|json)")
TIME_SPACING_H = 24.0


def as_absolute_path(value: Any, path: str) -> str:
    text = as_str(value, path)
    if not Path(text).expanduser().is_absolute():
        raise config_error(path, f"an absolute path of the folder or .zip is expected, got {text!r}")
    return text


@dataclass(frozen=True)
class Params:
    path: str = param(as_absolute_path)
    subset: str = param(as_choice(SUBSETS), "Tracking")
    wells: tuple[str, ...] | None = param(as_str_list(WELL, "well names such as W_E4_12", empty=False), None)
    masks: bool = param(as_bool, True)
    sha256: str | None = param(as_sha256, None)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "path": self.path, "subset": self.subset,
                "wells": list(self.wells) if self.wells is not None else None, "masks": self.masks,
                "sha256": self.sha256}


def parse_params(sec: Section) -> Params:
    return read_params(Params, sec)


# -- the user's folder or zip ---------------------------------------------------------------------


class _Subset:
    """The subset's files (``[Organoid/]<subset>/<well>/Proj_<t>.<ext>``) of the user's folder or zip."""

    def __init__(self, params: Params, dataset: str) -> None:
        self.params = params
        self.tree = LocalTree(params.path, dataset, f"set datasets.{dataset}.source.path in params.yaml to where "
                              "the data are (the authors send the data on request)")
        self.skipped: list[dict[str, Any]] = []

    def files(self) -> list[LocalFile]:
        self.skipped = []  # listed again (stamp): each skipped name once
        found = self.tree.files(self._accept)
        wells = sorted({f.rel.split("/")[0] for f in found})
        if not wells:
            raise FormatError(self.tree.dataset, str(self.tree.root), f"no {self.params.subset}/<well>/Proj_<t>.tif found",
                              "point path at the folder (or zip) holding Tracking/ and Detection/")
        if self.params.wells is not None:
            missing = sorted(set(self.params.wells) - set(wells))
            if missing:
                raise FormatError(self.tree.dataset, str(self.tree.root), f"no well {missing[0]!r} in "
                                  f"{self.params.subset}/ (wells: {', '.join(wells[:8])}{' ...' if len(wells) > 8 else ''})",
                                  "correct source.wells in params.yaml")
            found = [f for f in found if f.rel.split("/")[0] in self.params.wells]
        return sorted(found, key=lambda f: f.rel)

    def _accept(self, parts: list[str], member: str, size: int, mtime_ns: int) -> LocalFile | None:
        """``[Organoid/]<subset>/<well>/Proj_<t>.<ext>`` -> a LocalFile; other names are skipped."""
        if parts and parts[0] == "Organoid":
            parts = parts[1:]
        if not parts or parts[0] not in SUBSETS:
            return None
        if parts[0] != self.params.subset:
            return None  # the other subset: not this dataset's, not listed
        if len(parts) == 3 and WELL.fullmatch(parts[1]) and FRAME.fullmatch(parts[2]):
            return LocalFile(f"{parts[1]}/{parts[2]}", member, size, mtime_ns)
        self.skipped.append({"name": member, "size": size, "reason": "unexpected name"})
        return None


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    subset = _Subset(params, ctx.dataset)
    tree = subset.tree
    return [FilePlan(f.rel, tree.url + ("#" if tree.is_zip else "") + f.member, f.size, f.size, 0, "new")
            for f in subset.files()]


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    subset = _Subset(params, ctx.dataset)
    tree = subset.tree
    files = subset.files()
    _check_pairs(files, ctx.dataset, tree)
    fetched, source = tree.copy(files, ctx)
    if params.sha256 is not None and source["sha256"] != params.sha256:
        what = "zip" if tree.is_zip else "folder's manifest"
        raise IntegrityError(ctx.dataset, str(tree.root), f"the {what} sha256 is {source['sha256']}, params.yaml pins "
                             f"{params.sha256}", "the files changed since they were pinned: check them, then update "
                             "source.sha256 in params.yaml")
    # every TIF readable, every labelme file valid and the size of its TIF, before the import counts
    names = {str(ctx.dest / f.rel): tree.where(f) for f in files}
    try:
        shapes = {f.rel: _tif_shape(ctx.dest / f.rel, ctx.dataset) for f in files if not f.rel.endswith(".json")}
        for f in files:
            if f.rel.endswith(".json"):
                _check_annotation(ctx.dest, f.rel, ctx.dataset, shapes)
    except FormatError as exc:  # name the user's file, not the copy
        raise FormatError(ctx.dataset, names.get(exc.where, exc.where), exc.problem, exc.hint) from exc
    extra = {"sources": [source], "skipped": subset.skipped,
             "input_stamp": tree.stamp(files)}  # as listed before the copy: a change meanwhile re-imports
    return ctx.record(fetched, extra)


def _check_pairs(files: list[LocalFile], dataset: str, tree: LocalTree) -> None:
    tifs = {f.rel.rsplit(".", 1)[0] for f in files if not f.rel.endswith(".json")}
    for f in files:
        if f.rel.endswith(".json") and f.rel.rsplit(".", 1)[0] not in tifs:
            raise FormatError(dataset, tree.where(f), f"has no image beside it ({f.rel.rsplit('.', 1)[0]}.tif is missing)",
                              "add the missing TIF or remove the annotation, then run fetch again")


def _check_annotation(folder: Path, rel: str, dataset: str, shapes: dict[str, tuple[int, int]]) -> None:
    """The labelme file (copied to ``folder``) is valid and says the size of its TIF."""
    ann = load(folder / rel, dataset)
    tif = _tif_of(folder, rel)
    height, width = shapes[tif.relative_to(folder).as_posix()]
    if (ann.height, ann.width) != (height, width):
        raise FormatError(dataset, str(folder / rel), f"says the image is {ann.width} x {ann.height}, {tif.name} is "
                          f"{width} x {height}", "the annotation belongs to another image; fix it, then run fetch again")


def _tif_of(folder: Path, rel: str) -> Path:
    stem = folder / rel.rsplit(".", 1)[0]
    for ext in (".tif", ".tiff"):
        if stem.with_name(stem.name + ext).is_file():
            return stem.with_name(stem.name + ext)
    return stem.with_name(stem.name + ".tif")


def _tif_shape(path: Path, dataset: str) -> tuple[int, int]:
    with TiffStack(path, dataset) as stack:
        if stack.shape[0] != 1:
            raise FormatError(dataset, str(path), f"holds {stack.shape[0]} planes; one projected image is expected",
                              "check the file")
        return int(stack.shape[1]), int(stack.shape[2])


def input_stamp(params: Params, dataset: str) -> dict[str, Any]:
    """(size, mtime) of the zip, or of each chosen folder file: what says the user's files changed."""
    subset = _Subset(params, dataset)
    return subset.tree.stamp([] if subset.tree.is_zip else subset.files())


# -- reading the imported wells -------------------------------------------------------------------


def _wells(raw: Path) -> dict[str, list[tuple[int, Path, Path | None]]]:
    """well -> [(t, tif, json or None)] in t order."""
    wells: dict[str, list[tuple[int, Path, Path | None]]] = {}
    for folder in sorted(p for p in raw.iterdir() if p.is_dir() and WELL.fullmatch(p.name)):
        frames = {}
        for path in folder.iterdir():
            m = FRAME.fullmatch(path.name)
            if m and m["ext"] != "json":
                frames[int(m["t"])] = path
        wells[folder.name] = [(t, tif, _json_of(tif)) for t, tif in sorted(frames.items())]
    return wells


def _json_of(tif: Path) -> Path | None:
    candidate = tif.with_name(tif.name.rsplit(".", 1)[0] + ".json")
    return candidate if candidate.is_file() else None


BOX_DTYPE = np.dtype([("t", "<i4"), ("identity", "<i8"), ("x0", "<f8"), ("y0", "<f8"), ("x1", "<f8"), ("y1", "<f8")])


def _frame_info(dataset: str, tif: Path) -> tuple[tuple[int, int], np.dtype, tuple[float, float] | None]:
    with TiffStack(tif, dataset) as stack:
        if stack.shape[0] != 1:
            raise FormatError(dataset, str(tif), f"holds {stack.shape[0]} planes; one projected image is expected",
                              "check the file")
        shape, dtype = (int(stack.shape[1]), int(stack.shape[2])), np.dtype(stack.dtype)
    return shape, dtype, pixel_size_nm(tif, dataset)


def open_collection(params: Params, raw: Path, dataset: str) -> RawCollection:
    items, table, tables = [], [], {}
    for well, frames in _wells(raw).items():
        infos = [_frame_info(dataset, tif) for _, tif, _ in frames]
        shapes = [info[0] for info in infos]
        dtypes = {info[1] for info in infos}
        if len(dtypes) != 1:
            raise FormatError(dataset, str(raw / well), f"frames have different pixel types ({sorted(map(str, dtypes))})",
                              "all frames of a well must have one pixel type")
        pixel = infos[0][2]
        for (t, tif, _), info in zip(frames, infos):
            if (info[2] is None) != (pixel is None) or (pixel and info[2] and not same_geometry((1.0, *info[2]), (1.0, *pixel))):
                raise FormatError(dataset, str(tif), f"pixel size {info[2]} nm differs from the well's first frame "
                                  f"({pixel} nm)", "frames of a well must share a pixel size")
        annotations: list[Annotation | None] = [load(js, dataset) if js is not None else None for _, _, js in frames]
        for (t, tif, js), ann, shape in zip(frames, annotations, shapes):
            if ann is not None and (ann.height, ann.width) != shape:
                raise FormatError(dataset, str(js), f"says the image is {ann.width} x {ann.height}, {tif.name} is "
                                  f"{shape[1]} x {shape[0]}", "the annotation belongs to another image")
        boxes = [list(ann.boxes) if ann else [] for ann in annotations]
        ts = [t for t, _, _ in frames]
        frames_volume = TiffSeries(dataset, [tif for _, tif, _ in frames], shapes, dtypes.pop())
        full = frames_volume.shape
        common = {"time_spacing": TIME_SPACING_H, "time_unit": "h", "t": ts}
        items.append(CollectionItem(
            image=well, path="raw", open=frames_volume.opener, shape=full, dtype=frames_volume.dtype,
            axes="tyx", pixel_size_nm=pixel, attrs={**common, "files": [tif.name for _, tif, _ in frames]},
            source=str(raw / well)))
        if params.masks:
            masks = BoxMasks(dataset, boxes, full, shapes)
            items.append(CollectionItem(
                image=well, path="labels/organoids", open=masks.opener, shape=full, dtype=masks.dtype,
                axes="tyx", pixel_size_nm=pixel, label=True,
                attrs={**common, "identity_offset": 1, "values": "identity + 1 (0 = background)"},
                source=str(raw / well)))
        rows = [(t, b.identity, b.x0, b.y0, b.x1, b.y1) for t, frame in zip(ts, boxes) for b in frame]
        tables[f"images/{well}/annotations/boxes"] = np.array(sorted(rows, key=lambda r: (r[0], r[1])), BOX_DTYPE)
        tables[f"images/{well}/frames"] = np.array(
            [(t, h, w, len(b), js is not None, tif.name.encode())
             for (t, tif, js), (h, w), b in zip(frames, shapes, boxes)],
            [("t", "<i4"), ("height", "<i8"), ("width", "<i8"), ("boxes", "<i8"), ("annotated", "?"),
             ("file", f"S{max(len(tif.name) for _, tif, _ in frames)}")])
        table.append({"image": well, "subset": params.subset, "frames": len(frames), "t_first": ts[0], "t_last": ts[-1],
                      "height": full[1], "width": full[2], "dtype": str(frames_volume.dtype),
                      "boxes": len(rows), "identities": len({r[1] for r in rows}),
                      "annotated_frames": sum(a is not None for a in annotations),
                      "padded": any(s != full[1:] for s in shapes)})
    return RawCollection(dataset, items, table, tables)


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """labelme versions and imageData kinds seen, per well; the TIF tags of the first frame."""
    wells: dict[str, Any] = {}
    first_tags: dict[str, Any] = {}
    for well, frames in _wells(raw).items():
        versions, data = set(), set()
        for _, tif, js in frames:
            if js is not None:
                ann = load(js, dataset)
                versions.add(ann.version)
                data.add(ann.image_data)
            if not first_tags:
                with TiffStack(tif, dataset) as stack:
                    first_tags = {"file": f"{well}/{tif.name}", **stack.tags()}
        wells[well] = {"frames": len(frames), "labelme_versions": sorted(versions), "imageData": sorted(data)}
    record = FetchRecord.load(raw)
    return {"subset": params.subset, "wells": wells, "first_frame": first_tags,
            "skipped": (record.extra.get("skipped") if record else None) or [],
            "time_spacing_h": TIME_SPACING_H}

