"""EMPIAR entries: the EMPIAR REST API for what an imageset holds, the EBI HTTPS mirror for the files.

Generic over entries; params name the accession, the API URL, the imageset (by ``name`` or
``directory``), the mirror folder to list and the slice file pattern. EMPIAR-11759 (zebrafish
retina, SBF-SEM) is 16 DM3 files of one 5500 x 5496 uint8 section each, plus one XML file and a
``trakem2/`` tree (skipped unless ``include_folders`` names it).

- The API answer (``{"EMPIAR-11759": {...}}``; ``image_width`` is a string, ``pixel_width`` a
  float in Ångström, ``num_images_or_tilt_series`` an int) is stored as ``<accession>.api.json``.
- The mirror folder is an Apache autoindex: links are parsed, folders end in ``/``. The API's
  image count is the authority, because one backend's listing was seen to leave out a file
  that still answered: a numbered slice missing from the listing is asked for with HEAD and
  fetched when it answers; slices really missing are named together in one error. A count
  above twice the listed slices is refused before any HEAD; no more HEADs than the count are sent.
- No checksums are published: ``source.json`` records each file's size and sha256, and
  ``pins`` in params can fix them after a first download.
- Slices are stacked in natural filename order (``_2`` before ``_10``) and read through
  :mod:`emdata.formats.dm3` (RosettaSciIO). Z spacing comes from the DM3 tag
  ``ImageTags.SBFSEM.Record.Slice thickness``, the in-plane pixel from the calibration (µm ->
  nm), cross-checked against the API's ``pixel_width`` (Å -> nm): more than 1 % apart is a
  FormatError unless the dataset's ``geometry_trust`` names ``dm3`` or ``api``
  (:func:`emdata.core.geometry.pick`), or is ``params`` with ``voxel_size_nm`` given, which
  overrides both. Changing it fetches nothing again: it is not part of the fetch spec.

Licence: CC0 (every EMPIAR entry). Cite the entry DOI (10.6019/EMPIAR-11759) and its paper.

params.yaml::

    source:
      kind: empiar
      accession: EMPIAR-11759
      api_url: https://www.ebi.ac.uk/empiar/api/entry/EMPIAR-11759/
      base_url: https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/
      imageset: data                  # the imageset's name or directory in the API answer
      pattern: "*.dm3"                # the slices (fnmatch, names in base_url)
      extra_files: ["*.xml"]          # also fetched, not stacked
      include_folders: []             # e.g. [trakem2]: fetched whole, recursively
      pins: {NAME: {size: N, sha256: HEX}}
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emdata.core.atomic import write_bytes_atomic
from emdata.core.geometry import PARAMS, pick
from emdata.core.numbers import ascii_int
from emdata.errors import ConfigError, FetchError, FormatError
from emdata.formats.dm3 import Dm3Stack, natural_sorted
from emdata.params.schema import (
    Section,
    as_folder_url,
    as_matching,
    as_str,
    as_str_list,
    as_url,
    param,
    read_params,
)
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.files import FilePlan, RemoteFile, as_pins, as_relpaths, fetch_files, plan_files
from emdata.sources.fetch.listing import child_url, list_tree, missing_in_series, parse_listing
from emdata.sources.fetch.record import FetchedFile, FetchRecord

KIND = "empiar"
READERS = ("emdata.formats.dm3",)
FETCHERS = ("emdata.sources.fetch.listing",)  # which files of the mirror are fetched
# fetch parses each slice's DM3 header (RosettaSciIO) and records it in source.json, so normalize
# reads pixels at the recorded offsets without importing the reader (it and the dask/pandas it
# loads cost ~70 MiB of RSS) and a corrupt or ragged slice is refused before it is ever stored.
DECODES_ON_FETCH = True
GEOMETRY_CANDIDATES = ("dm3", "api")  # the pixel size, read twice (geometry_trust picks one)
PIXEL_LABELS = {"dm3": "the DM3 calibration", "api": "the EMPIAR API"}
API_PIXEL_FROM = "EMPIAR API pixel_height/pixel_width"
ACCESSION = re.compile(r"EMPIAR-\d+")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    accession: str = param(as_matching(ACCESSION, "an EMPIAR accession (EMPIAR-<number>)"))
    api_url: str = param(as_url)
    base_url: str = param(as_folder_url)
    imageset: str = param(as_str)
    pattern: str = param(as_str)
    extra_files: tuple[str, ...] = param(as_str_list(), ())
    include_folders: tuple[str, ...] = param(as_relpaths, ())
    pins: dict[str, dict[str, Any]] = param(as_pins, {})
    geometry_trust: str | None = field(default=None, compare=False)  # the dataset's, set by sources.dataset

    @property
    def entry_file(self) -> str:
        return f"{self.accession}.api.json"

    def to_dict(self) -> dict[str, Any]:
        """The fetch spec: what decides the fetched bytes (not ``geometry_trust``, which only normalize reads)."""
        return {"kind": KIND, "accession": self.accession, "api_url": self.api_url, "base_url": self.base_url,
                "imageset": self.imageset, "pattern": self.pattern, "extra_files": list(self.extra_files),
                "include_folders": list(self.include_folders),
                "pins": {k: dict(v) for k, v in sorted(self.pins.items())}}


def parse_params(sec: Section) -> Params:
    return read_params(Params, sec)


# -- the API answer ------------------------------------------------------------------------------


def select_imageset(entry: dict[str, Any], wanted: str, dataset: str, where: str) -> dict[str, Any]:
    """The imageset whose name or directory is ``wanted`` (a trailing ``/`` ignored)."""
    sets = entry.get("imagesets")
    if not isinstance(sets, list) or not sets:
        raise FormatError(dataset, where, "the entry lists no imagesets", "check source.accession and source.api_url")
    for item in sets:
        if isinstance(item, dict) and wanted.strip("/") in (str(item.get("name", "")).strip("/"),
                                                             str(item.get("directory", "")).strip("/")):
            return item
    names = ", ".join(repr(s.get("name") or s.get("directory")) for s in sets if isinstance(s, dict))
    raise FormatError(dataset, where, f"no imageset named {wanted!r} (the entry has {names})",
                      "set source.imageset to one of them (name or directory)")


def image_count(imageset: dict[str, Any], dataset: str, where: str) -> int:
    value = imageset.get("num_images_or_tilt_series")
    count = value if isinstance(value, int) and not isinstance(value, bool) else ascii_int(value)
    if count is None:
        raise FormatError(dataset, where, f"num_images_or_tilt_series is {value!r}, not a count",
                          "the API's answer changed shape; please report it")
    return count


def api_pixel_nm(imageset: dict[str, Any]) -> tuple[float, float] | None:
    """(y, x) pixel size in nm from ``pixel_height``/``pixel_width`` (Å), or None when absent."""
    try:
        x = float(imageset["pixel_width"]) / 10.0
        y = float(imageset.get("pixel_height") or imageset["pixel_width"]) / 10.0
    except (KeyError, TypeError, ValueError):
        return None
    return (y, x) if x > 0 and y > 0 else None


def _entry(params: Params, answer: Any, dataset: str) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get(params.accession), dict):
        keys = ", ".join(map(str, answer)) if isinstance(answer, dict) else type(answer).__name__
        raise FormatError(dataset, params.api_url, f"the answer has no entry {params.accession!r} (found: {keys})",
                          "check source.accession and source.api_url")
    return answer[params.accession]


# -- what the API and the mirror say ----------------------------------------------------------


@dataclass
class Discovery:
    entry: dict[str, Any]
    imageset: dict[str, Any]
    slices: list[str]
    files: list[RemoteFile]  # slices (natural order), extra files, included folders
    unlisted: list[str]  # slices the listing left out that answered a HEAD request
    requests: int  # API, listings and HEAD probes


def discover(params: Params, ctx: FetchContext) -> Discovery:
    """Ask the API what the imageset holds and the mirror where its files are (no download)."""
    entry = _entry(params, ctx.http.get_json(params.api_url), ctx.dataset)
    imageset = select_imageset(entry, params.imageset, ctx.dataset, params.api_url)
    count = image_count(imageset, ctx.dataset, params.api_url)
    files, folders = parse_listing(ctx.http.get_text(params.base_url))
    requests = 2
    slices = [n for n in files if fnmatch.fnmatchcase(n, params.pattern)]
    if len(slices) > count:
        raise FormatError(ctx.dataset, params.base_url, f"{len(slices)} files match {params.pattern!r} but the API "
                          f"lists {count} images in imageset {params.imageset!r}",
                          "narrow source.pattern to the imageset's slices")
    if count - len(slices) > len(slices):
        # A listing was seen to leave out a file, not most of them: a count the listing does not
        # support is not looked for file by file (an absurd count would cost one HEAD per image).
        raise FormatError(ctx.dataset, params.api_url, f"num_images_or_tilt_series is {count} for imageset "
                          f"{params.imageset!r} but the mirror lists {len(slices)} files matching "
                          f"{params.pattern!r} in {params.base_url}; more missing than listed is not a listing "
                          "that left a file out", "check source.pattern and source.imageset; if they are right, "
                          "the entry's image count is wrong: please report it to EMPIAR")
    unlisted: list[str] = []
    missing: list[str] = []
    for name in missing_in_series(slices, count):
        if len(slices) + len(unlisted) >= count:
            break
        requests += 1
        if ctx.http.probe(child_url(params.base_url, name)) is None:
            missing.append(name)
        else:
            unlisted.append(name)
    short = count - len(slices) - len(unlisted)
    if short > 0:
        detail = f"missing: {', '.join(missing)} (not in the listing; HEAD answered 404)" if missing else \
            f"{short} unnamed file(s) (the listed names are no numbered series to guess from)"
        raise FetchError(ctx.dataset, params.base_url, f"the API lists {count} images in imageset "
                         f"{params.imageset!r} but the mirror has {count - short}; {detail}",
                         "the mirror may be incomplete: try again later, or check source.pattern")
    if unlisted:
        log.warning("%s: %s not in the listing of %s but served; fetched (the API count is the authority)",
                    ctx.dataset, ", ".join(unlisted), params.base_url)
    slices = natural_sorted(slices + unlisted)
    extras = [n for n in files if n not in slices and any(fnmatch.fnmatchcase(n, p) for p in params.extra_files)]
    tree: list[tuple[str, str]] = []
    for folder in params.include_folders:
        if folder not in folders:
            raise FormatError(ctx.dataset, params.base_url, f"no folder {folder + '/'!r} in the listing "
                              f"(folders: {', '.join(folders) or 'none'})", "check source.include_folders")
        requests += list_tree(ctx, child_url(params.base_url, folder + "/"), folder + "/", tree)
    urls = [(n, child_url(params.base_url, n)) for n in slices + extras] + tree
    unknown = sorted(set(params.pins) - {n for n, _ in urls})
    if unknown:
        raise ConfigError(f"params.yaml: datasets.{ctx.dataset}.source.pins.{unknown[0]}: no such file in "
                          f"{params.base_url} (fetched: {', '.join(slices[:3])}, ...)")
    remote = [RemoteFile(n, u, params.pins.get(n, {}).get("size"), params.pins.get(n, {}).get("sha256"))
              for n, u in urls]
    return Discovery(entry, imageset, slices, remote, unlisted, requests)


def _entry_bytes(params: Params, entry: dict[str, Any]) -> bytes:
    return (json.dumps({params.accession: entry}, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    """The API answer (its row counts the API, listing and probe requests), then HEAD per file."""
    found = discover(params, ctx)
    size = len(_entry_bytes(params, found.entry))
    return [FilePlan(params.entry_file, params.api_url, size, size, found.requests, "new"),
            *plan_files(ctx, found.files)]


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    found = discover(params, ctx)
    data = _entry_bytes(params, found.entry)
    write_bytes_atomic(ctx.path(params.entry_file), data)
    files = {params.entry_file: FetchedFile(params.api_url, len(data), hashlib.sha256(data).hexdigest())}
    files.update(fetch_files(ctx, found.files))
    return ctx.record(files, {"imageset": found.imageset.get("name") or found.imageset.get("directory"),
                              "slices": found.slices, "unlisted": found.unlisted,
                              "dm3": _parse_headers(ctx, found.slices)})


def _parse_headers(ctx: FetchContext, slices: list[str]) -> dict[str, Any]:
    """Each slice's DM3 header (the first with its tag tree); a bad slice is removed, to be fetched again."""
    try:
        stack = Dm3Stack.parse([ctx.dest / name for name in slices], ctx.dataset)
    except FormatError as exc:
        bad = Path(exc.where)
        if bad.parent == ctx.dest and bad.name in slices:
            bad.unlink(missing_ok=True)
        raise
    return {name: image.header(tags=i == 0) for i, (name, image) in enumerate(zip(slices, stack.slices))}


# -- reading what was fetched ------------------------------------------------------------------


def _fetched(params: Params, raw: Path, dataset: str) -> tuple[dict[str, Any], Dm3Stack]:
    """The stored API entry, and the slices (natural order) from the headers fetch recorded."""
    path = raw / params.entry_file
    try:
        entry = _entry(params, json.loads(path.read_text(encoding="utf-8")), dataset)
    except (OSError, ValueError) as exc:
        raise FormatError(dataset, str(path), f"cannot read the stored API answer ({exc})",
                          f"run `emdata fetch {dataset}` again") from exc
    record = FetchRecord.load(raw)
    files = record.files if record else {}
    names = natural_sorted([n for n in files if "/" not in n and fnmatch.fnmatchcase(n, params.pattern)])
    headers = (record.extra.get("dm3") if record else None) or {}
    if sorted(headers) != sorted(names):
        raise FormatError(dataset, str(raw / "source.json"), "the fetch record has no DM3 header for every slice",
                          f"run `emdata fetch {dataset}` again")
    return entry, Dm3Stack.from_headers([raw / n for n in names], [headers[n] for n in names], dataset)


def open_volume(params: Params, raw: Path, dataset: str) -> Dm3Stack:
    return _opened(params, raw, dataset)[1]


def _opened(params: Params, raw: Path, dataset: str) -> tuple[dict[str, Any], Dm3Stack]:
    """The stored API entry and the stack with its pixel size chosen (which its metadata names)."""
    entry, stack = _fetched(params, raw, dataset)
    imageset = select_imageset(entry, params.imageset, dataset, str(raw / params.entry_file))
    _choose_pixel_size(params, stack, imageset, dataset)
    return entry, stack


def _choose_pixel_size(params: Params, stack: Dm3Stack, imageset: dict[str, Any], dataset: str) -> None:
    """The DM3 calibration or the API's pixel size, by :func:`emdata.core.geometry.pick` (the DM3's first).

    ``geometry_trust: params`` reaches here only with params' ``voxel_size_nm``, which overrides either.
    """
    api = api_pixel_nm(imageset)
    choice = pick("pixel size", {"dm3": stack.slices[0].pixel_nm, "api": api}, params.geometry_trust,
                  key=dataset, labels=PIXEL_LABELS, trusted_by={"dm3": (PARAMS,)}, where=str(stack.slices[0].path))
    if choice.name == "api" and api is not None:
        stack.set_pixel_size(api, API_PIXEL_FROM)


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    entry, stack = _opened(params, raw, dataset)
    return {"empiar_entry": entry, **stack.native_metadata()}


def describe(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    """Instrument, detector and entry facts for the record (flat)."""
    entry, stack = _fetched(params, raw, dataset)
    imageset = select_imageset(entry, params.imageset, dataset, str(raw / params.entry_file))
    names = [image.path.name for image in stack.slices]
    tags = stack.slices[0].image_tags
    scope = tags.get("Microscope Info") or {}
    session = tags.get("Session Info") or {}
    bar = tags.get("DataBar") or {}
    papers = [str(c["doi"]) for c in entry.get("citation") or [] if isinstance(c, dict) and c.get("doi")]
    out = {
        "instrument": scope.get("Name") or session.get("Microscope") or None,
        "detector": session.get("Detector") or bar.get("Signal Name") or None,
        "acceleration_voltage_v": scope.get("Voltage"),
        "indicated_magnification": scope.get("Indicated Magnification"),
        "acquisition_date": bar.get("Acquisition Date"),
        "entry_title": entry.get("title"),
        "entry_doi": entry.get("entry_doi"),
        "experiment_type": entry.get("experiment_type"),
        "release_date": entry.get("release_date"),
        "paper_doi": ", ".join(papers) or None,
        "imageset": imageset.get("name"),
        "images": len(names),
    }
    return {k: v for k, v in out.items() if v not in (None, "")}
