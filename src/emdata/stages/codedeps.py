"""Which code decides a dataset's bytes, as small committed files that dvc.yaml depends on.

DVC cannot give each ``foreach`` item its own list of dependencies (a list cannot be
interpolated), so each source kind gets two fingerprint files, ``pipeline/code/<kind>-fetch.json``
and ``pipeline/code/<kind>-normalize.json``, listing the sha256 of every module that decides the
bytes of that stage's outputs. ``fetch@<ds>`` and ``normalize@<ds>`` depend on their kind's file;
a change to that code changes the file and re-runs exactly the stages it affects, while a change
elsewhere (CLI, access layer, HTTP transport, another kind's reader) re-runs nothing.

- normalize: the source module, the readers it declares (``READERS``), and the shared writer
  (normalize, tiles, stats, kernels, raw, geometry, io/hdf5, io/chunks, metadata, chunk_index,
  normalize_distributed).
- fetch: the source module and the fetch record; plus its readers when the source decodes
  while fetching (``DECODES_ON_FETCH = True``, e.g. a precomputed crop), and the modules it
  declares in ``FETCHERS`` (code that decides the fetched bytes, e.g. archive extraction).
- collections (``LAYOUT = "collection"``): normalize also depends on the collection writer and
  layout (``COLLECTION_CODE``); volume kinds do not.

``python -m emdata code-deps --write`` rewrites the files; a test and ``emdata check`` fail when
they are stale, so a reader change cannot slip past DVC.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from emdata.core.digest import sha256_file

FOLDER = Path("pipeline") / "code"
STAGES = ("fetch", "normalize")
NORMALIZE_CODE = ("emdata.stages.normalize.volume", "emdata.core.boxes", "emdata.core.stats", "emdata.core.kernels", "emdata.formats.raw",
                  "emdata.core.geometry", "emdata.h5.hdf5", "emdata.h5.chunks", "emdata.h5.metadata", "emdata.h5.chunk_index",
                  "emdata.stages.normalize.distributed")
FETCH_CODE = ("emdata.sources.fetch.record",)
COLLECTION_CODE = ("emdata.h5.collection", "emdata.stages.normalize.collection")


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # type: ignore[attr-defined]
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(name)
    return Path(spec.origin)


def modules_for(kind: str, stage: str) -> list[str]:
    """The modules whose code decides the outputs of ``stage`` for source ``kind``."""
    from emdata.sources import get_source

    source = get_source(kind)
    readers = tuple(getattr(source, "READERS", ()))
    if stage == "normalize":
        layout = COLLECTION_CODE if getattr(source, "LAYOUT", "volume") == "collection" else ()
        names = (source.__name__, *readers, *NORMALIZE_CODE, *layout)
    elif stage == "fetch":
        names = (source.__name__, *FETCH_CODE, *tuple(getattr(source, "FETCHERS", ())),
                 *(readers if getattr(source, "DECODES_ON_FETCH", False) else ()))
    else:
        raise ValueError(stage)
    return sorted(set(names))


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
    from emdata.core.atomic import write_bytes_atomic

    changed = []
    for kind in sorted(kinds):
        for stage in STAGES:
            path = path_for(root, kind, stage)
            text = _text(fingerprint(kind, stage))
            if not path.is_file() or path.read_text() != text:
                write_bytes_atomic(path, text.encode())
                changed.append(path)
    return changed
