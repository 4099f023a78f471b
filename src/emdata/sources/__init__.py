"""Source kinds: a kind is a module whose ``KIND`` names it in params.yaml (``source.kind``).

The verbs every module provides are typed by :class:`emdata.sources.protocol.Source`:
``parse_params``, ``plan``, ``fetch``, ``open_volume``, ``read_metadata`` and optionally
``open_labels``. A module with ``LAYOUT = "collection"`` (a dataset of many images with a table)
provides ``open_collection`` instead of ``open_volume`` (:class:`~.protocol.CollectionSource`). Built-in kinds are listed in ``KINDS``; other packages (or a test) add kinds
through the ``emdata.sources`` entry-point group (``kind = "package.module"``), with no change
to this package. Source modules import their heavy readers lazily.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from emdata.errors import ConfigError

ENTRY_POINT_GROUP = "emdata.sources"
REQUIRED = ("KIND", "parse_params", "plan", "fetch", "open_volume", "read_metadata")  # see protocol.Source
REQUIRED_COLLECTION = ("KIND", "parse_params", "plan", "fetch", "open_collection", "read_metadata")
KINDS: dict[str, str] = {
    "epfl": "emdata.sources.epfl",
    "empiar": "emdata.sources.empiar",
    "idr": "emdata.sources.idr",
    "precomputed": "emdata.sources.precomputed",
    "ome_zarr_s3": "emdata.sources.ome_zarr_s3",
    "lightmycells": "emdata.sources.lightmycells",
    "labelme_tracking": "emdata.sources.labelme_tracking",
}

if TYPE_CHECKING:  # mypy checks every built-in module against the protocol here
    from emdata.sources import empiar, epfl, idr, labelme_tracking, lightmycells, ome_zarr_s3, precomputed
    from emdata.sources.protocol import CollectionSource, DescribedSource, LabelledSource, LocalSource

    _epfl: LabelledSource = epfl
    _empiar: DescribedSource = empiar
    _idr: DescribedSource = idr
    _precomputed: DescribedSource = precomputed
    _ome_zarr_s3: LabelledSource = ome_zarr_s3
    _ome_zarr_s3_described: DescribedSource = ome_zarr_s3
    _lightmycells: CollectionSource = lightmycells
    _labelme_tracking: LocalSource = labelme_tracking


def plugin_kinds() -> dict[str, str]:
    """Kinds registered by installed distributions (entry points), kind -> module."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_kinds() -> dict[str, str]:
    return {**plugin_kinds(), **KINDS}


def get_source(kind: str, path: str = "source.kind") -> ModuleType:
    """The module implementing ``kind``; a ConfigError names the key path if there is none."""
    target = KINDS.get(kind)
    if target is None:
        target = plugin_kinds().get(kind)
    if target is None:
        raise ConfigError(f"params.yaml: {path}: unknown source kind {kind!r} "
                          f"(known kinds: {', '.join(sorted(known_kinds()))})")
    module = importlib.import_module(target)
    required = REQUIRED_COLLECTION if layout_of(module) == "collection" else REQUIRED
    missing = [name for name in required if not hasattr(module, name)]
    if missing or getattr(module, "KIND", None) != kind:
        raise ConfigError(f"params.yaml: {path}: module {target} does not implement source kind {kind!r} "
                          f"(missing: {', '.join(missing) or 'KIND = ' + repr(kind)})")
    return module


def layout_of(module: ModuleType) -> str:
    """``"volume"`` (the default: one ZYX volume per dataset) or ``"collection"`` (images + table)."""
    return str(getattr(module, "LAYOUT", "volume"))
