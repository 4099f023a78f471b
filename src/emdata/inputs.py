"""The ``inputs`` stage: what DVC cannot see of each dataset's source, one small file per dataset.

DVC re-runs ``fetch@<ds>`` when one of its dependencies changes, but a ``foreach`` stage cannot
depend on a folder that only some datasets have (the organoid set is a folder or zip outside the
repository, wherever the user keeps it). So each ``fetch@<ds>`` depends on ``data/inputs/<ds>.json``
and the ``inputs`` stage, which DVC runs on every ``dvc repro`` (``always_changed``), rewrites
those files:

- a source with ``input_stamp`` (local imports): the stamp of the user's files (sizes and
  modification times, no hashing, so it costs milliseconds), or why they cannot be read;
- any other source: its kind only, which never changes (remote data are pinned by params).

A file is rewritten only when its content changes, so nothing downstream re-runs otherwise. The
files are small, kept in git (``cache: false``), and show in a diff when the local data changed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .config import Config
from .errors import ConfigError, EmdataError
from .io.atomic import write_bytes_atomic
from .sources import get_source

log = logging.getLogger(__name__)


def describe_inputs(cfg: Config, key: str) -> dict[str, Any]:
    """The content of ``data/inputs/<key>.json``; never raises for one dataset's problem."""
    try:
        ds = cfg.dataset(key)
    except ConfigError as exc:  # fetch@<key> reports it; the other datasets go on
        return {"invalid": str(exc)}
    content: dict[str, Any] = {"kind": ds.source_kind}
    stamp = getattr(get_source(ds.source_kind), "input_stamp", None)
    if stamp is not None:
        try:
            content["stamp"] = stamp(ds.source, key)
        except EmdataError as exc:
            log.warning("%s", exc)
            content["unavailable"] = str(exc)
    return content


def write_inputs(cfg: Config) -> dict[str, bool]:
    """Bring ``data/inputs/`` up to date with params.yaml; map each dataset to "its file changed"."""
    folder = cfg.inputs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    changed = {}
    for key in cfg.datasets:
        path = folder / f"{key}.json"
        text = (json.dumps(describe_inputs(cfg, key), indent=1, sort_keys=True) + "\n").encode()
        changed[key] = not path.is_file() or path.read_bytes() != text
        if changed[key]:
            write_bytes_atomic(path, text)
    for stale in folder.glob("*.json"):
        if stale.stem not in cfg.datasets:  # a dataset removed from params.yaml
            stale.unlink()
    return changed
