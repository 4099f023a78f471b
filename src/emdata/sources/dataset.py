"""A dataset resolved once per command: its params entry, its source read by its kind's module,
the module itself, where its files live, and its lock.

A command (``emdata fetch``, a DVC stage) calls :func:`resolve_dataset` at its start and hands the
:class:`Dataset` down: fetch -> source -> fetch machinery -> transport, each step reading what it
needs from the object and never going back to params.yaml.

Geometry: the entry's ``geometry_trust`` is checked here against the names the source offers
(``params``, ``source`` and the kind's ``GEOMETRY_CANDIDATES``, e.g. EMPIAR's ``dm3``/``api``), and a
kind with candidates of its own gets it in its Params' ``geometry_trust`` field, to settle their
disagreements in ``open_volume`` (:func:`emdata.core.geometry.pick`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from types import ModuleType
from typing import Any

from emdata.core.geometry import PARAMS, SOURCE
from emdata.core.lock import dataset_lock
from emdata.errors import ConfigError
from emdata.params.config import Config, DatasetEntry, Datasets
from emdata.params.layout import DatasetPaths, Layout
from emdata.params.schema import Section, as_choice, config_error
from emdata.sources import get_source, layout_of


@dataclass(frozen=True)
class Dataset(DatasetEntry):
    """A params entry (title, licence, geometry overrides, ...) with what resolving it adds."""

    source: Any = field(kw_only=True)  # the kind's frozen Params (its ``to_dict()`` is the fetch spec)
    module: ModuleType = field(kw_only=True, repr=False, compare=False)  # the kind's source module
    paths: DatasetPaths = field(kw_only=True)

    @property
    def geometry_candidates(self) -> tuple[str, ...]:
        """The source's own names for what it reads twice (``dm3``/``api``); ``geometry_trust`` takes them too."""
        return candidates_of(self.module)

    @property
    def layout(self) -> str:
        """``"volume"`` or ``"collection"`` (see :func:`emdata.sources.layout_of`)."""
        return layout_of(self.module)

    def lock(self, command: str) -> AbstractContextManager[None]:
        """The dataset's lock for ``command`` (one fetch or normalize of a dataset at a time)."""
        return dataset_lock(self.paths.locks, self.key, command)


def resolve_dataset(cfg: Config, key: str) -> Dataset:
    """The pipeline's dataset ``key``, resolved (a ConfigError names the key path of any mistake)."""
    cfg.require(key)  # an unknown key: the error lists the known ones (the entry is parsed below, source first)
    return resolve_entry(cfg.datasets, key, cfg)


def resolve_entry(datasets: Datasets, key: str, layout: Layout) -> Dataset:
    """Entry ``key`` of ``datasets`` (the pipeline's or the optional ones): the source first, as
    a mistake in it is the likelier one, then the entry's own keys."""
    src = datasets.source_section(key)
    kind = src.data["kind"]
    module = get_source(kind, path=src.key_path("kind"))
    trust_names = (PARAMS, SOURCE, *candidates_of(module))
    _refuse_moved_trust_keys(src, f"{datasets.section}.{key}", trust_names)
    params = module.parse_params(src)
    src.finish()
    entry = datasets[key]
    if entry.geometry_trust is not None:
        as_choice(trust_names)(entry.geometry_trust, f"{datasets.section}.{key}.geometry_trust")
    if candidates_of(module):
        params = replace(params, geometry_trust=_source_trust(entry))
    common = {f.name: getattr(entry, f.name) for f in fields(DatasetEntry)}
    return Dataset(**common, source=params, module=module, paths=layout.paths(key))


def candidates_of(module: ModuleType) -> tuple[str, ...]:
    """A kind's own geometry candidates (``GEOMETRY_CANDIDATES``; none for most kinds)."""
    return tuple(getattr(module, "GEOMETRY_CANDIDATES", ()))


def _source_trust(entry: DatasetEntry) -> str | None:
    """``geometry_trust`` as the source's own choice reads it. ``params`` settles the source's
    candidates (they only say the voxel size) only when params.yaml gives the voxel size that
    overrides them all; without it their disagreement still needs a name."""
    if entry.geometry_trust == PARAMS and entry.voxel_size_nm is None:
        return None
    return entry.geometry_trust


MOVED_TRUST_KEYS = ("pixel_size_trust", "geometry_from")  # EMPIAR's and IDR's before geometry_trust


def _refuse_moved_trust_keys(src: Section, entry_path: str, names: tuple[str, ...]) -> None:
    for old in MOVED_TRUST_KEYS:
        if old in src.data:
            value = src.data[old]
            write = f"geometry_trust: {value}" if isinstance(value, str) else "geometry_trust"
            raise config_error(src.key_path(old), f"replaced by {entry_path}.geometry_trust: write `{write}` in "
                               f"{entry_path} instead (one of {', '.join(names)})")


def resolve_all(datasets: Datasets, layout: Layout) -> dict[str, Dataset | ConfigError]:
    """Every entry of ``datasets`` resolved, or the error that stops it (``emdata check`` and ``list``)."""
    out: dict[str, Dataset | ConfigError] = {}
    for key in datasets:
        try:
            out[key] = resolve_entry(datasets, key, layout)
        except ConfigError as exc:
            out[key] = exc
    return out


def registered_kinds(cfg: Config) -> set[str]:
    """Registered source kinds of the pipeline's and the optional datasets (what pipeline/code/
    covers); a misspelt kind is reported by the dataset's own check."""
    found = set()
    for kind in cfg.kinds_written():
        try:
            get_source(kind)  # built-in or plug-in
        except ConfigError:
            continue
        found.add(kind)
    return found
