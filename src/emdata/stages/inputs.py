"""The ``inputs`` stage: what DVC cannot see of each dataset's source, one small file per dataset.

DVC re-runs ``fetch@<ds>`` when one of its dependencies changes, but a ``foreach`` stage cannot
depend on a folder that only some datasets have (the organoid set is a folder or zip outside the
repository, wherever the user keeps it). So each ``fetch@<ds>`` depends on ``data/inputs/<ds>.json``
and the ``inputs`` stage, which DVC runs on every ``dvc repro`` (``always_changed``), rewrites
those files:

- a source with ``input_stamp`` (local imports): the stamp of the user's files (sizes and
  modification times, no hashing, so it costs milliseconds), or why they cannot be read; when
  they cannot be read and a stamp is already recorded (a clone that got ``data/raw`` by ``dvc
  pull``, an unmounted disk), the recorded stamp stays, so the pipeline keeps the last import;
- any other source: its kind only, which never changes (remote data are pinned by params).

A file is rewritten only when its content changes (``persist: true``: DVC does not delete the
folder before the stage runs), so nothing downstream re-runs otherwise. The files are small, kept
in git (``cache: false``), and show in a diff when the local data changed. The stamp that
``emdata fetch`` compares lives in ``data/.state/<ds>.input_stamp.json`` (local, not versioned),
not in the fetch record: touching or copying the files re-imports them, but the imported bytes,
the record and so the HDF5 stay the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from emdata.core.atomic import write_bytes_atomic
from emdata.errors import ConfigError, EmdataError
from emdata.params.config import Config
from emdata.sources.dataset import Dataset, resolve_all

log = logging.getLogger(__name__)


def _has_stamp(path: Path) -> bool:
    try:
        return "stamp" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def describe_inputs(ds: Dataset | ConfigError) -> dict[str, Any]:
    """The content of ``data/inputs/<key>.json`` for a resolved dataset (or the error that stops it:
    ``fetch@<key>`` reports it, the other datasets go on); never raises for one dataset's problem."""
    if isinstance(ds, ConfigError):
        return {"invalid": str(ds)}
    content: dict[str, Any] = {"kind": ds.source_kind}
    stamp = getattr(ds.module, "input_stamp", None)
    if stamp is not None:
        try:
            content["stamp"] = stamp(ds.source, ds.key)
        except EmdataError as exc:
            log.warning("%s", exc)
            content["unavailable"] = str(exc)
    return content


def write_inputs(cfg: Config) -> dict[str, bool]:
    """Bring ``data/inputs/`` up to date with params.yaml; map each dataset to "its file changed"."""
    folder = cfg.inputs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    changed = {}
    for key, ds in resolve_all(cfg.datasets, cfg).items():
        path = folder / f"{key}.json"
        content = describe_inputs(ds)
        if "unavailable" in content and _has_stamp(path):
            # A clone that got data/raw by `dvc pull`, or an unmounted disk: the last import stands
            # (fetch@<ds> stays up to date) rather than failing the pipeline for files it already has.
            changed[key] = False
            continue
        text = (json.dumps(content, indent=1, sort_keys=True) + "\n").encode()
        changed[key] = not path.is_file() or path.read_bytes() != text
        if changed[key]:
            write_bytes_atomic(path, text)
    for stale in folder.glob("*.json"):  # membership by key: an invalid entry is not parsed here
        if stale.stem not in cfg.datasets:  # a dataset removed from params.yaml
            stale.unlink()
    return changed
