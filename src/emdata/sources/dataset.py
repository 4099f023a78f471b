"""A dataset resolved once per command: its params entry, its source read by its kind's module,
the module itself, where its files live, and its lock.

A command (``emdata fetch``, a DVC stage) calls :func:`resolve_dataset` at its start and hands the
:class:`Dataset` down: fetch -> source -> fetch machinery -> transport, each step reading what it
needs from the object and never going back to params.yaml.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any

from emdata.core.lock import dataset_lock
from emdata.errors import ConfigError
from emdata.params.config import Config, DatasetEntry, Datasets
from emdata.params.layout import DatasetPaths, Layout
from emdata.sources import get_source, layout_of


@dataclass(frozen=True)
class Dataset(DatasetEntry):
    """A params entry (title, licence, geometry overrides, ...) with what resolving it adds."""

    source: Any = field(kw_only=True)  # the kind's frozen Params (its ``to_dict()`` is the fetch spec)
    module: ModuleType = field(kw_only=True, repr=False, compare=False)  # the kind's source module
    paths: DatasetPaths = field(kw_only=True)

    @property
    def layout(self) -> str:
        """``"volume"`` or ``"collection"`` (see :func:`emdata.sources.layout_of`)."""
        return layout_of(self.module)

    def lock(self, command: str) -> AbstractContextManager[None]:
        """The dataset's lock for ``command`` (one fetch or normalize of a dataset at a time)."""
        return dataset_lock(self.paths.locks, self.key, command)


def resolve_dataset(cfg: Config, key: str) -> Dataset:
    """The pipeline's dataset ``key``, resolved (a ConfigError names the key path of any mistake)."""
    cfg.dataset(key)  # an unknown key: the error lists the known ones
    return resolve_entry(cfg.datasets, key, cfg)


def resolve_entry(datasets: Datasets, key: str, layout: Layout) -> Dataset:
    """Entry ``key`` of ``datasets`` (the pipeline's or the optional ones): the source first, as
    a mistake in it is the likelier one, then the entry's own keys."""
    src = datasets.source_section(key)
    kind = src.data["kind"]
    module = get_source(kind, path=src.key_path("kind"))
    params = module.parse_params(src)
    src.finish()
    entry = datasets[key]
    common = {f.name: getattr(entry, f.name) for f in fields(DatasetEntry)}
    return Dataset(**common, source=params, module=module, paths=layout.paths(key))


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
