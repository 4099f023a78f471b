"""Which code decides a dataset's bytes, as small committed files that dvc.yaml depends on.

DVC cannot give each ``foreach`` item its own list of dependencies (a list cannot be
interpolated), so each source kind gets two fingerprint files, ``pipeline/code/<kind>-fetch.json``
and ``pipeline/code/<kind>-normalize.json``, listing the sha256 of every module that decides the
bytes of that stage's outputs. ``fetch@<ds>`` and ``normalize@<ds>`` depend on their kind's file;
a change to that code changes the file and re-runs exactly the stages it affects, while a change
elsewhere (CLI, access layer, another kind's source or reader) re-runs nothing.

The modules are not listed by hand: they are the import closure (:mod:`emdata.stages.imports`)
of the stage's entry module (``ENTRIES``) and of the kind's source module (with what it declares
in ``READERS`` and ``FETCHERS``, for code it loads by name). Three rules take modules out, each
because that code cannot change the stage's output bytes:

- ``NOT_OUTPUT``: modules that run in every stage but decide no byte of any output (one reason each);
- fetch of a kind that stores what it fetches as served (``DECODES_ON_FETCH`` false): its
  ``READERS``, unless the fetch stage itself imports them; they decode only in normalize;
- normalize of a volume kind: the collection writer, which runs only for ``LAYOUT = "collection"``.

``python -m emdata code-deps --write`` rewrites the files; a test and ``emdata check`` fail when
they are stale, so a code change cannot slip past DVC.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from emdata.core.atomic import write_bytes_atomic
from emdata.core.digest import sha256_file
from emdata.sources import get_source, layout_of
from emdata.stages.imports import import_closure, package_modules

FOLDER = Path("pipeline") / "code"
STAGES = ("fetch", "normalize")
ENTRIES = {"fetch": "emdata.stages.fetch", "normalize": "emdata.stages.normalize.volume"}
NOT_OUTPUT = {
    "emdata": "the front door: stages import only __version__ from it, recorded in outputs but no reason "
              "to rebuild them (two builds are compared without it too); the rest is the read API",
    "emdata.core.lock": "keeps two runs of a dataset apart: decides when a stage writes, not what",
    "emdata.core.progress": "progress bars on the terminal",
    "emdata.stages.codedeps": "these fingerprints: they decide which stages re-run, not their bytes",
    "emdata.stages.imports": "reads imports for these fingerprints",
    "emdata.transport.header_deadline": "a time limit for a response's headers: it decides when a request "
                                        "fails and is retried, never which bytes arrive",
    "emdata.transport.retry": "how often and how long to retry: decides whether a fetch succeeds, not its bytes",
    "emdata.transport.failures": "turns a failure into a one-line reason; errors are not outputs",
}
COLLECTION_WRITER = "emdata.stages.normalize.collection"


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(name)
    return Path(spec.origin)


def modules_for(kind: str, stage: str) -> list[str]:
    """The modules whose code decides the outputs of ``stage`` for source ``kind``."""
    if stage not in ENTRIES:
        raise ValueError(stage)
    source = get_source(kind)
    readers = [str(m) for m in getattr(source, "READERS", ())]
    fetchers = [str(m) for m in getattr(source, "FETCHERS", ())]
    modules = package_modules()
    for name in (source.__name__, *readers, *fetchers):  # a plug-in kind's modules live outside emdata
        modules.setdefault(name, _module_file(name))
    stop = set(NOT_OUTPUT)
    roots = [ENTRIES[stage], source.__name__, *fetchers]
    if stage == "normalize":
        roots += readers
        if layout_of(source) != "collection":
            stop.add(COLLECTION_WRITER)
    elif not getattr(source, "DECODES_ON_FETCH", False):
        stop |= set(readers) - import_closure([ENTRIES["fetch"]], modules, stop=stop)
    return sorted(import_closure(roots, modules, stop=stop))


def fingerprint(kind: str, stage: str) -> dict[str, Any]:
    """Module name -> sha256 of its file, for the modules that decide ``stage``'s outputs of ``kind``.

    Keyed by module name, not path, so the file is the same wherever the package is installed.
    """
    modules = {name: sha256_file(_module_file(name)) for name in modules_for(kind, stage)}
    return {"kind": kind, "stage": stage, "modules": dict(sorted(modules.items()))}


def path_for(root: Path, kind: str, stage: str) -> Path:
    return root / FOLDER / f"{kind}-{stage}.json"


def _text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def stale(root: Path, kinds: set[str]) -> list[str]:
    """Fingerprint files that are missing or no longer match the code (relative paths)."""
    out = []
    for kind in sorted(kinds):
        for stage in STAGES:
            path = path_for(root, kind, stage)
            if not path.is_file() or path.read_text() != _text(fingerprint(kind, stage)):
                out.append(str(path.relative_to(root)))
    return out


def write(root: Path, kinds: set[str]) -> list[Path]:
    """(Re)write the fingerprint files of ``kinds``; return the ones whose content changed."""
    changed = []
    for kind in sorted(kinds):
        for stage in STAGES:
            path = path_for(root, kind, stage)
            text = _text(fingerprint(kind, stage))
            if not path.is_file() or path.read_text() != text:
                write_bytes_atomic(path, text.encode())
                changed.append(path)
    return changed
