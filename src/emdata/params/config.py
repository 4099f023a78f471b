"""params.yaml -> frozen dataclasses.

Every key is checked: an unknown or missing key, or a value of the wrong type, raises a
:class:`ConfigError` that names the full key path (``datasets.epfl_hippocampus.source.image``),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from emdata.errors import ConfigError

PARAMS_FILE = "params.yaml"
KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
COMPRESSIONS = ("none", "zstd", "blosc-lz4")
GEOMETRY_TRUST = ("params", "source")
MIB = 1 << 20


class Section:
    """A mapping read key by key; ``finish()`` rejects keys nobody asked for."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{PARAMS_FILE}: {path}: expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.path = path
        self._seen: set[str] = set()

    def _key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def required(self, key: str, parse: Callable[[Any, str], Any]) -> Any:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            raise ConfigError(f"{PARAMS_FILE}: {self._key_path(key)}: missing required key")
        return parse(self.data[key], self._key_path(key))

    def optional(self, key: str, parse: Callable[[Any, str], Any], default: Any = None) -> Any:
        self._seen.add(key)
        if self.data.get(key) is None:
            return default
        return parse(self.data[key], self._key_path(key))

    def section(self, key: str, *, required: bool = True) -> "Section":
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{PARAMS_FILE}: {self._key_path(key)}: missing required section")
            return Section({}, self._key_path(key))
        return Section(self.data[key], self._key_path(key))

    def keys(self) -> list[str]:
        """All keys of this section, each marked as read (for user-named keys such as datasets)."""
        self._seen.update(self.data)
        return list(self.data)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            allowed = ", ".join(sorted(self._seen))
            raise ConfigError(
                f"{PARAMS_FILE}: {self._key_path(unknown[0])}: unknown key (allowed here: {allowed})"
            )


# --- value parsers: (value, key_path) -> typed value -------------------------------------------


def as_str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected a non-empty string, got {value!r}")
    return value


def as_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected a non-negative integer, got {value!r}")
    return value


def as_int_range(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(value: Any, path: str) -> int:
        number = as_int(value, path)
        if not low <= number <= high:
            raise ConfigError(f"{PARAMS_FILE}: {path}: expected an integer from {low} to {high}, got {value!r}")
        return number

    return parse


def as_sha256(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected 64 lowercase hex digits (sha256), got {value!r}")
    return value


def as_url(value: Any, path: str) -> str:
    text = as_str(value, path)
    if not re.match(r"^https?://", text):
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected an http(s) URL, got {value!r}")
    try:
        urllib.parse.urlsplit(text)  # "Invalid IPv6 URL" here, not later in urljoin
    except ValueError as exc:
        raise ConfigError(f"{PARAMS_FILE}: {path}: invalid URL {value!r} ({exc})") from None
    return text


def as_triple(positive: bool) -> Callable[[Any, str], tuple[float, float, float]]:
    def parse(value: Any, path: str) -> tuple[float, float, float]:
        ok = isinstance(value, (list, tuple)) and len(value) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ok = ok and all(math.isfinite(v) and (v > 0 if positive else True) for v in value)
        if not ok:
            kind = "positive numbers" if positive else "numbers"
            raise ConfigError(f"{PARAMS_FILE}: {path}: expected three {kind} [z, y, x], got {value!r}")
        return tuple(float(v) for v in value)  # type: ignore[return-value]

    return parse


def as_int_triple(value: Any, path: str) -> tuple[int, int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected three positive integers [z, y, x], got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def as_int_pair(value: Any, path: str) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected two positive integers [y, x], got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def as_choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, path: str) -> str:
        if value not in choices:
            raise ConfigError(f"{PARAMS_FILE}: {path}: expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def as_label_values(value: Any, path: str) -> dict[str, dict[int, int]]:
    """``{label: {native value: stored value}}``, e.g. ``{mitochondria: {255: 1}}``."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{PARAMS_FILE}: {path}: expected {{label: {{native: stored}}}}, got {value!r}")
    out: dict[str, dict[int, int]] = {}
    for name, mapping in value.items():
        ok = isinstance(name, str) and KEY_PATTERN.fullmatch(name) and isinstance(mapping, Mapping) and mapping
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for pair in mapping.items() for v in pair)
        if not ok:
            raise ConfigError(f"{PARAMS_FILE}: {path}.{name}: expected a label name with a mapping of integers "
                              f"{{native: stored}}, got {mapping!r}")
        out[name] = {int(k): int(v) for k, v in mapping.items()}
    return out


def processed_relpath(key: str) -> str:
    """Where normalize writes a dataset's HDF5, relative to the repository (dvc.yaml agrees)."""
    return f"data/processed/{key}.h5"


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
class DatasetConfig:
    """One entry of ``datasets`` in params.yaml."""

    key: str
    title: str
    license: str
    citation: str
    modality: str
    voxel_size_nm: tuple[float, float, float] | None  # an override; None: the source must say
    offset_nm: tuple[float, float, float] | None
    geometry_trust: str | None  # which side wins when params and source disagree by > 1 %
    source_kind: str
    source: Any  # the source module's frozen Params dataclass
    raw_params: dict = field(repr=False, compare=False, default_factory=dict)
    label_values: dict[str, dict[int, int]] = field(default_factory=dict)  # label -> {native: stored}
    accession: str | None = None
    doi: str | None = None


class Datasets(Mapping[str, DatasetConfig]):
    """``datasets`` of params.yaml, each entry parsed on first use.

    A command on one dataset parses only that one, so a typo elsewhere does not block it;
    ``Config.check()`` (``emdata check``/``emdata list``) parses them all.
    """

    def __init__(self, entries: dict[str, Any], section: str = "datasets") -> None:
        self._entries = entries
        self._section = section  # how errors name an entry's path in params.yaml
        self._parsed: dict[str, DatasetConfig] = {}

    def __getitem__(self, key: str) -> DatasetConfig:
        if key not in self._parsed:
            self._parsed[key] = parse_dataset(key, self._entries[key], self._section)
        return self._parsed[key]

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
class Config:
    root: Path
    normalize: NormalizeParams
    datasets: Datasets
    # Entries a user moves under ``datasets`` once they have the files (not downloadable); not
    # in the pipeline. ``emdata check`` validates them; the offline demo builds them from replicas.
    optional: Datasets = field(default_factory=lambda: Datasets({}, "optional_datasets"))

    def dataset(self, key: str) -> DatasetConfig:
        if key not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError(f"unknown dataset {key!r}; datasets in {PARAMS_FILE}: {known}")
        return self.datasets[key]

    def kinds(self) -> set[str]:
        """Registered source kinds of the pipeline's and the optional datasets (what pipeline/code/
        covers); a misspelt kind is reported by the dataset's own check."""
        from emdata.sources import get_source

        found = set()
        for kind in {k for d in (self.datasets, self.optional) for k in (d.kind_of(key) for key in d) if k}:
            try:
                get_source(kind)  # built-in or plug-in
            except ConfigError:
                continue
            found.add(kind)
        return found

    def check(self) -> dict[str, ConfigError | None]:
        """Parse every dataset; map each key to its error, or None when it is valid."""
        return _check(self.datasets)

    def check_optional(self) -> dict[str, ConfigError | None]:
        """The same for ``optional_datasets`` (not in the pipeline, checked all the same)."""
        return _check(self.optional)

    # Where each stage puts its outputs (dvc.yaml uses the same paths).
    def raw_dir(self, key: str) -> Path:
        return self.root / "data" / "raw" / key

    def lock_dir(self) -> Path:
        return self.root / "data" / ".locks"

    def hash_state_path(self, key: str) -> Path:
        """Local cache of verified raw-file hashes (fetch_record.HashState); never versioned."""
        return self.root / "data" / ".state" / f"{key}.json"

    def partial_dir(self, key: str) -> Path:
        return self.root / "data" / "raw" / ".partial" / key

    def processed_path(self, key: str) -> Path:
        return self.root / processed_relpath(key)

    def record_path(self, key: str) -> Path:
        return self.root / "data" / "metadata" / f"{key}.json"

    def input_stamp_path(self, key: str) -> Path:
        """The stamp of a local import's files at its last fetch (local state, never versioned)."""
        return self.root / "data" / ".state" / f"{key}.input_stamp.json"

    def inputs_dir(self) -> Path:
        """What DVC cannot see of each source (``emdata.stages.inputs``); fetch@<ds> depends on one file."""
        return self.root / "data" / "inputs"


def _check(datasets: Datasets) -> dict[str, ConfigError | None]:
    problems: dict[str, ConfigError | None] = {}
    for key in datasets:
        try:
            datasets[key]
            problems[key] = None
        except ConfigError as exc:
            problems[key] = exc
    return problems


def parse_dataset(key: str, data: Any, section: str = "datasets") -> DatasetConfig:
    from emdata.sources import get_source  # sources import config helpers; avoid a cycle at import

    valid = isinstance(key, str) and KEY_PATTERN.fullmatch(key)
    path = f"{section}.{key}" if valid else f"{section}.{key!r}"
    if not valid:
        raise ConfigError(f"{PARAMS_FILE}: {path}: dataset keys must match {KEY_PATTERN.pattern}")
    sec = Section(data, path)
    src = sec.section("source")
    kind = src.required("kind", as_str)
    source = get_source(kind, path=f"{path}.source.kind")
    source_params = source.parse_params(src)
    src.finish()
    cfg = DatasetConfig(
        key=key,
        title=sec.required("title", as_str),
        license=sec.required("license", as_str),
        citation=sec.required("citation", as_str),
        modality=sec.required("modality", as_str),
        voxel_size_nm=sec.optional("voxel_size_nm", as_triple(positive=True)),
        offset_nm=sec.optional("offset_nm", as_triple(positive=False)),
        geometry_trust=sec.optional("geometry_trust", as_choice(GEOMETRY_TRUST)),
        label_values=sec.optional("label_values", as_label_values, {}),
        accession=sec.optional("accession", as_str),
        doi=sec.optional("doi", as_str),
        source_kind=kind,
        source=source_params,
        raw_params=dict(data),
    )
    sec.finish()
    return cfg


def find_root(start: Path | None = None) -> Path:
    """The project folder: ``$EMDATA_PROJECT``, else the nearest parent holding params.yaml."""
    env = os.environ.get("EMDATA_PROJECT")
    if env:
        root = Path(env).resolve()
        if not (root / PARAMS_FILE).is_file():
            raise ConfigError(f"EMDATA_PROJECT={env}: no {PARAMS_FILE} there")
        return root
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(
        f"no {PARAMS_FILE} in {here} or its parents; run inside an emdata repository or set EMDATA_PROJECT"
    )


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
