"""Source kinds. A kind is a module here whose file name is its ``KIND``.

Each module provides (see :mod:`emdata.sources.base` for the shared pieces):

- ``KIND``: the registry key used in params.yaml (``datasets.<ds>.source.kind``);
- ``parse_params(section) -> Params``: the typed, frozen form of ``datasets.<ds>.source``;
- ``plan(params, client, partial) -> list[FilePlan]``: what a fetch would transfer (no download);
- ``fetch(params, client, dest) -> dict``: write everything into ``dest``; resumable, the only
  function that touches the network besides ``plan``;
- ``open_volume(params, raw, dataset) -> RawVolume``: lazy ZYX view over the local raw copy;
- ``open_labels(params, raw, dataset) -> dict[str, RawVolume]``;
- ``read_metadata(params, raw, dataset) -> dict``: native metadata as found, JSON-safe.

Adding a source is one module here, one line in ``KINDS``, and one replica in
:mod:`emdata.testing` that runs the shared contract tests.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

KINDS: dict[str, str] = {
    "epfl": "emdata.sources.epfl",
}


def get_source(kind: str, path: str = "source.kind") -> ModuleType:
    """The module implementing ``kind``; a ConfigError names the key path if there is none."""
    if kind not in KINDS:
        raise ConfigError(
            f"params.yaml: {path}: unknown source kind {kind!r} (known kinds: {', '.join(sorted(KINDS))})"
        )
    return importlib.import_module(KINDS[kind])
