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

import hashlib
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emdata.params.config import Section, as_sha256, as_str
from emdata.errors import ConfigError, FetchError, FormatError, IntegrityError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile, FetchRecord
from emdata.sources.fetch.files import FilePlan

if TYPE_CHECKING:
    from emdata.h5.collection import RawCollection
    from emdata.formats.labelme import Annotation

KIND = "labelme_tracking"
LAYOUT = "collection"
READERS = ("emdata.formats.labelme", "emdata.formats.tiff", "emdata.formats.tiffseries")
FETCHERS = ("emdata.transport.archive",)  # zip member checks
SUBSETS = ("Tracking", "Detection")
WELL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
FRAME = re.compile(r"Proj_(?P<t>[0-9]{1,6})\.(?P<ext>tif|tiff|json)")
TIME_SPACING_H = 24.0
BLOCK = 1 << 20


@dataclass(frozen=True)
class Params:
    path: str
    subset: str = "Tracking"
    wells: tuple[str, ...] | None = None
    masks: bool = True
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "path": self.path, "subset": self.subset,
                "wells": list(self.wells) if self.wells is not None else None, "masks": self.masks,
                "sha256": self.sha256}


def parse_params(sec: Section) -> Params:
    path = sec.required("path", as_str)
    if not Path(path).expanduser().is_absolute():
        raise ConfigError(f"params.yaml: {sec.path}.path: an absolute path of the folder or .zip is expected, "
                          f"got {path!r}")
    subset = sec.optional("subset", as_str, "Tracking")
    if subset not in SUBSETS:
        raise ConfigError(f"params.yaml: {sec.path}.subset: expected one of {', '.join(SUBSETS)}, got {subset!r}")
    wells = sec.optional("wells", _as_wells)
    masks = sec.optional("masks", _as_bool, True)
    return Params(path=path, subset=subset, wells=wells, masks=masks, sha256=sec.optional("sha256", as_sha256))


def _as_wells(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and WELL.fullmatch(v) for v in value):
        raise ConfigError(f"params.yaml: {path}: expected a list of well names such as W_E4_12, got {value!r}")
    return tuple(value)


def _as_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"params.yaml: {path}: expected true or false, got {value!r}")
    return value


# -- the user's folder or zip ---------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    rel: str  # where it goes in the raw folder: <well>/Proj_<t>.<ext>
    member: str  # path inside the folder or zip
    size: int
    mtime_ns: int


class _Tree:
    """The subset's files in a folder or a zip, with the names refused or skipped on the way."""

    def __init__(self, params: Params, dataset: str) -> None:
        self.params = params
        self.dataset = dataset
        self.root = Path(params.path).expanduser()
        self.url = self.root.as_uri() + ("" if self.is_zip else "/")
        self.skipped: list[dict[str, Any]] = []
        if not self.root.exists():
            raise FetchError(dataset, str(self.root), "no such folder or file",
                             f"set datasets.{dataset}.source.path in params.yaml to where the data are (the "
                             "authors send the data on request)")
        if self.root.is_symlink():
            raise FetchError(dataset, str(self.root), "is a symbolic link", "give the real path in params.yaml")

    @property
    def is_zip(self) -> bool:
        return self.root.is_file()

    def files(self) -> list[SourceFile]:
        self.skipped = []  # listed again (stamp): each skipped name once
        found = self._zip_files() if self.is_zip else self._folder_files()
        wells = sorted({f.rel.split("/")[0] for f in found})
        if not wells:
            raise FormatError(self.dataset, str(self.root), f"no {self.params.subset}/<well>/Proj_<t>.tif found",
                              "point path at the folder (or zip) holding Tracking/ and Detection/")
        if self.params.wells is not None:
            missing = sorted(set(self.params.wells) - set(wells))
            if missing:
                raise FormatError(self.dataset, str(self.root), f"no well {missing[0]!r} in {self.params.subset}/ "
                                  f"(wells: {', '.join(wells[:8])}{' ...' if len(wells) > 8 else ''})",
                                  "correct source.wells in params.yaml")
            found = [f for f in found if f.rel.split("/")[0] in self.params.wells]
        return sorted(found, key=lambda f: f.rel)

    def _accept(self, parts: list[str], member: str, size: int, mtime_ns: int) -> SourceFile | None:
        """``[Organoid/]<subset>/<well>/Proj_<t>.<ext>`` -> a SourceFile; other names are skipped."""
        if parts and parts[0] == "Organoid":
            parts = parts[1:]
        if not parts or parts[0] not in SUBSETS:
            return None
        if parts[0] != self.params.subset:
            return None  # the other subset: not this dataset's, not listed
        if len(parts) == 3 and WELL.fullmatch(parts[1]) and FRAME.fullmatch(parts[2]):
            return SourceFile(f"{parts[1]}/{parts[2]}", member, size, mtime_ns)
        self.skipped.append({"name": member, "size": size, "reason": "unexpected name"})
        return None

    def _folder_files(self) -> list[SourceFile]:
        out = []
        for folder, dirs, names in os.walk(self.root):
            here = Path(folder)
            for name in sorted(dirs):
                if (here / name).is_symlink():
                    raise FormatError(self.dataset, str(here / name), "is a symbolic link",
                                      "emdata imports real folders and files only; copy the data instead")
            dirs.sort()
            for name in sorted(names):
                path = here / name
                info = path.lstat()
                rel = path.relative_to(self.root).as_posix()
                if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
                    raise FormatError(self.dataset, str(path), "is a symbolic link or not a regular file",
                                      "emdata imports real files only; copy the data instead")
                got = self._accept(rel.split("/"), rel, info.st_size, info.st_mtime_ns)
                if got is not None:
                    out.append(got)
        return out

    def _zip_files(self) -> list[SourceFile]:
        from emdata.transport.archive import unsafe_name

        out = []
        try:
            with zipfile.ZipFile(self.root) as zf:
                for info in zf.infolist():
                    why = unsafe_name(info.filename.rstrip("/"))
                    if why is not None:
                        raise FormatError(self.dataset, f"{self.root} member {info.filename!r}", f"refused: the member {why}",
                                          "the zip is not what the authors ship; do not extract it by hand")
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise FormatError(self.dataset, f"{self.root} member {info.filename!r}",
                                          "refused: the member is a symbolic link", "the zip is not what the authors ship")
                    if info.is_dir():
                        continue
                    got = self._accept(info.filename.split("/"), info.filename, info.file_size, 0)
                    if got is not None:
                        out.append(got)
        except zipfile.BadZipFile as exc:
            raise FormatError(self.dataset, str(self.root), f"not a readable zip ({exc})",
                              "give the folder, or a complete .zip of it") from exc
        return out

    def where(self, f: SourceFile) -> str:
        """How messages name a source file: its path, or the zip and the member."""
        return f"{self.root} member {f.member}" if self.is_zip else str(self.root / f.member)

    def open(self, f: SourceFile, zf: zipfile.ZipFile | None) -> Any:
        return zf.open(f.member) if zf is not None else open(self.root / f.member, "rb")

    def stamp(self, files: list[SourceFile] | None = None) -> dict[str, Any]:
        """The input stamp: (size, mtime) of the zip, or of each folder file (no hashing: cheap on
        every ``dvc repro``); ``files``: the listing already made, else the folder is listed."""
        if self.is_zip:
            info = self.root.stat()
            listed = {"": [info.st_size, info.st_mtime_ns]}
        else:
            listed = {f.member: [f.size, f.mtime_ns] for f in (self.files() if files is None else files)}
        return {"path": str(self.params.path), "files": listed}


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    tree = _Tree(params, ctx.dataset)
    return [FilePlan(f.rel, tree.url + ("#" if tree.is_zip else "") + f.member, f.size, f.size, 0, "new")
            for f in tree.files()]


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    tree = _Tree(params, ctx.dataset)
    files = tree.files()
    _check_pairs(files, ctx.dataset, tree)
    whole = hashlib.sha256()
    fetched: dict[str, FetchedFile] = {}
    zf = zipfile.ZipFile(tree.root) if tree.is_zip else None
    try:
        manifest = []
        for f in files:
            size, digest = _copy(tree, f, zf, ctx.path(f.rel), ctx.dataset)
            fetched[f.rel] = FetchedFile(f"{tree.url}#{f.member}", size, digest)
            manifest.append(f"{f.member}\t{size}\t{digest}\n")
        if zf is None:
            for line in manifest:
                whole.update(line.encode())
            size_total = sum(v.size for v in fetched.values())
        else:
            size_total = tree.root.stat().st_size
            with open(tree.root, "rb") as fh:
                for block in iter(lambda: fh.read(BLOCK), b""):
                    whole.update(block)
    finally:
        if zf is not None:
            zf.close()
    digest = whole.hexdigest()
    if params.sha256 is not None and digest != params.sha256:
        what = "zip" if tree.is_zip else "folder's manifest"
        raise IntegrityError(ctx.dataset, str(tree.root), f"the {what} sha256 is {digest}, params.yaml pins "
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
    extra = {"sources": [{"url": tree.url, "size": size_total, "sha256": digest,
                          "what": "zip archive" if tree.is_zip else "folder manifest (member, size, sha256 per line)"}],
             "skipped": tree.skipped,
             "input_stamp": tree.stamp(files)}  # as listed before the copy: a change meanwhile re-imports
    return ctx.record(fetched, extra)


def _check_pairs(files: list[SourceFile], dataset: str, tree: _Tree) -> None:
    tifs = {f.rel.rsplit(".", 1)[0] for f in files if not f.rel.endswith(".json")}
    for f in files:
        if f.rel.endswith(".json") and f.rel.rsplit(".", 1)[0] not in tifs:
            raise FormatError(dataset, tree.where(f), f"has no image beside it ({f.rel.rsplit('.', 1)[0]}.tif is missing)",
                              "add the missing TIF or remove the annotation, then run fetch again")


def _check_annotation(folder: Path, rel: str, dataset: str, shapes: dict[str, tuple[int, int]]) -> None:
    """The labelme file (copied to ``folder``) is valid and says the size of its TIF."""
    from emdata.formats.labelme import load

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
    from emdata.formats.tiff import TiffStack

    with TiffStack(path, dataset) as stack:
        if stack.shape[0] != 1:
            raise FormatError(dataset, str(path), f"holds {stack.shape[0]} planes; one projected image is expected",
                              "check the file")
        return int(stack.shape[1]), int(stack.shape[2])


def _copy(tree: _Tree, f: SourceFile, zf: zipfile.ZipFile | None, target: Path, dataset: str) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with tree.open(f, zf) as src, open(tmp, "xb") as dst:
            for block in iter(lambda: src.read(BLOCK), b""):
                sha.update(block)
                dst.write(block)
                size += len(block)
        os.replace(tmp, target)
    except (OSError, zipfile.BadZipFile) as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(dataset, f"{tree.root}#{f.member}", f"cannot be copied ({exc})",
                         "check the source files and the free space, then run fetch again") from exc
    return size, sha.hexdigest()


def input_stamp(params: Params, dataset: str) -> dict[str, Any]:
    """(size, mtime) of the zip, or of each chosen folder file: what says the user's files changed."""
    return _Tree(params, dataset).stamp()


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
    from emdata.formats.tiff import TiffStack

    with TiffStack(tif, dataset) as stack:
        if stack.shape[0] != 1:
            raise FormatError(dataset, str(tif), f"holds {stack.shape[0]} planes; one projected image is expected",
                              "check the file")
        shape, dtype = (int(stack.shape[1]), int(stack.shape[2])), np.dtype(stack.dtype)
    from emdata.formats.tiffseries import pixel_size_nm

    return shape, dtype, pixel_size_nm(tif, dataset)


def open_collection(params: Params, raw: Path, dataset: str) -> "RawCollection":
    from emdata.h5.collection import CollectionItem, RawCollection
    from emdata.core.geometry import same_geometry
    from emdata.formats.labelme import BoxMasks, load
    from emdata.formats.tiffseries import TiffSeries

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
    from emdata.formats.labelme import load
    from emdata.formats.tiff import TiffStack

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

