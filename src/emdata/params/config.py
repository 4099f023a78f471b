"""params.yaml -> frozen dataclasses: the normalize settings and each dataset's entry.

Every key is checked: an unknown or missing key, or a value of the wrong type, raises a
:class:`ConfigError` that names the full key path (``datasets.epfl_hippocampus.title``), so a
typo never silently falls back to a default. An entry's ``source`` section is left to its kind's
source module: :mod:`emdata.sources.dataset` reads it when a command resolves the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from emdata.errors import ConfigError
from emdata.params.layout import Layout, find_root
from emdata.params.schema import (
    KEY_PATTERN,
    MIB,
    PARAMS_FILE,
    Section,
    as_choice,
    as_int_pair,
    as_int_range,
    as_int_triple,
    as_label_values,
    as_str,
    as_triple,
    config_error,
)

COMPRESSIONS = ("none", "zstd", "blosc-lz4")


# --- the configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizeParams:
    """How the canonical HDF5 is laid out (``normalize`` in params.yaml)."""

    chunks: tuple[int, int, int] = (64, 64, 64)
    compression: str = "none"
    compression_level: int = 3
    memory_budget_mb: int = 256  # working set of normalize (tiles in flight), whatever the XY size
    image_chunks: tuple[int, int] = (256, 256)  # (y, x) chunks of the 2D images of collections

    @classmethod
    def parse(cls, sec: Section) -> "NormalizeParams":
        out = cls(
            chunks=sec.optional("chunks", as_int_triple, cls.chunks),
            compression=sec.optional("compression", as_choice(COMPRESSIONS), cls.compression),
            compression_level=sec.optional("compression_level", as_int_range(0, 22), cls.compression_level),
            memory_budget_mb=sec.optional("memory_budget_mb", as_int_range(16, 1 << 20), cls.memory_budget_mb),
            image_chunks=sec.optional("image_chunks", as_int_pair, cls.image_chunks),
        )
        sec.finish()
        return out

    @property
    def memory_budget(self) -> int:
        return self.memory_budget_mb * MIB

    def to_dict(self) -> dict[str, Any]:
        """What decides the output bytes (the memory budget does not, so it is left out)."""
        return {"chunks": list(self.chunks), "compression": self.compression,
                "compression_level": self.compression_level}


@dataclass(frozen=True)
class DatasetEntry:
    """One entry of ``datasets`` in params.yaml, but for its ``source`` section (only its kind)."""

    key: str
    title: str
    license: str
    citation: str
    modality: str
    voxel_size_nm: tuple[float, float, float] | None  # an override; None: the source must say
    offset_nm: tuple[float, float, float] | None
    geometry_trust: str | None  # the geometry candidate that wins a disagreement (checked by sources.dataset)
    source_kind: str
    raw_params: dict = field(repr=False, compare=False, default_factory=dict)
    label_values: dict[str, dict[int, int]] = field(default_factory=dict)  # label -> {native: stored}
    accession: str | None = None
    doi: str | None = None


class Datasets(Mapping[str, DatasetEntry]):
    """``datasets`` of params.yaml, each entry parsed on first use.

    A command on one dataset parses only that one, so a typo elsewhere does not block it;
    ``emdata check`` and ``emdata list`` resolve them all (:func:`emdata.sources.dataset.resolve_all`).
    """

    def __init__(self, entries: dict[str, Any], section: str = "datasets") -> None:
        self._entries = entries
        self.section = section  # how errors name an entry's path in params.yaml
        self._parsed: dict[str, DatasetEntry] = {}

    def __getitem__(self, key: str) -> DatasetEntry:
        if key not in self._parsed:
            self._parsed[key] = parse_entry(key, self._entries[key], self.section)
        return self._parsed[key]

    def source_section(self, key: str) -> Section:
        """The entry's ``source`` section with its ``kind`` read (for the kind's module to read the rest)."""
        sec = Section(self._entries[key], _entry_path(key, self.section))
        src = sec.section("source")
        src.required("kind", as_str)
        return src

    def __contains__(self, key: object) -> bool:  # Mapping's default parses the entry (and may raise)
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def kind_of(self, key: str) -> str | None:
        """The source kind as written, without parsing the entry (None if it cannot be read)."""
        entry = self._entries.get(key)
        source = entry.get("source") if isinstance(entry, Mapping) else None
        kind = source.get("kind") if isinstance(source, Mapping) else None
        return kind if isinstance(kind, str) else None


@dataclass(frozen=True)
class Config(Layout):
    """params.yaml of the project at ``root`` (a :class:`Layout`: it also says where files live)."""

    normalize: NormalizeParams
    datasets: Datasets
    # Entries a user moves under ``datasets`` once they have the files (not downloadable); not
    # in the pipeline. ``emdata check`` validates them; the offline demo builds them from replicas.
    optional: Datasets = field(default_factory=lambda: Datasets({}, "optional_datasets"))

    def require(self, key: str) -> None:
        """A ConfigError listing the pipeline's datasets when ``key`` is not one; parses nothing."""
        if key not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError(f"unknown dataset {key!r}; datasets in {PARAMS_FILE}: {known}")

    def kinds_written(self) -> set[str]:
        """Source kinds as written in the pipeline's and the optional datasets (unchecked)."""
        return {k for d in (self.datasets, self.optional) for k in (d.kind_of(key) for key in d) if k}


def _entry_path(key: Any, section: str) -> str:
    """``datasets.<key>``; a ConfigError when the key is not a dataset key."""
    valid = isinstance(key, str) and KEY_PATTERN.fullmatch(key)
    path = f"{section}.{key}" if valid else f"{section}.{key!r}"
    if not valid:
        raise config_error(path, f"dataset keys must match {KEY_PATTERN.pattern}")
    return path


def parse_entry(key: str, data: Any, section: str = "datasets") -> DatasetEntry:
    """An entry's own keys; its ``source`` section is read by the kind's module, not here."""
    sec = Section(data, _entry_path(key, section))
    kind = sec.section("source").required("kind", as_str)
    entry = DatasetEntry(
        key=key,
        title=sec.required("title", as_str),
        license=sec.required("license", as_str),
        citation=sec.required("citation", as_str),
        modality=sec.required("modality", as_str),
        voxel_size_nm=sec.optional("voxel_size_nm", as_triple(positive=True)),
        offset_nm=sec.optional("offset_nm", as_triple(positive=False)),
        # its values are the candidate names the source offers: resolve_entry checks them
        geometry_trust=sec.optional("geometry_trust", as_str),
        label_values=sec.optional("label_values", as_label_values, {}),
        accession=sec.optional("accession", as_str),
        doi=sec.optional("doi", as_str),
        source_kind=kind,
        raw_params=dict(data),
    )
    sec.finish()
    return entry


def _strict_loader() -> Any:
    """PyYAML's safe loader, refusing duplicate keys (by default the last one silently wins)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def load_config(root: Path | None = None) -> Config:
    import yaml

    root = find_root() if root is None else Path(root).resolve()
    params_path = root / PARAMS_FILE
    try:
        data = yaml.load(params_path.read_text(encoding="utf-8"), Loader=_strict_loader())  # noqa: S506
    except FileNotFoundError as exc:
        raise ConfigError(f"{params_path}: not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{params_path}: cannot be read ({exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{params_path}: not valid YAML{where}: {problem}") from exc
    top = Section(data or {}, "")
    normalize = NormalizeParams.parse(top.section("normalize", required=False))
    datasets_sec = top.section("datasets")
    datasets_sec.keys()  # user-named: each entry is checked when it is first used
    optional_sec = top.section("optional_datasets", required=False)
    optional_sec.keys()
    top.finish()
    both = sorted(set(datasets_sec.data) & set(optional_sec.data))
    if both:
        raise ConfigError(f"{params_path}: {both[0]!r} is under both datasets and optional_datasets; keep it under "
                          "datasets (to build it) or optional_datasets (not yet)")
    return Config(root=root, normalize=normalize, datasets=Datasets(dict(datasets_sec.data)),
                  optional=Datasets(dict(optional_sec.data), "optional_datasets"))
