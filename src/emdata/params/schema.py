"""How params.yaml is read: :class:`Section`, the typed value parsers, and typed params fields.

The leaf of the params layer: every source module declares its ``Params`` with :func:`param`
fields and reads them with :func:`read_params`, so each mistake is one :class:`ConfigError` that
names the full key path (``params.yaml: datasets.x.source.bucket: ...``) and an unknown key is never
silently ignored. A value parser is ``(value, key_path) -> typed value``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.parse
from typing import Any, Callable, Mapping, TypeVar

from emdata.errors import ConfigError

PARAMS_FILE = "params.yaml"
KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
MIB = 1 << 20

T = TypeVar("T")
Parser = Callable[[Any, str], Any]


def config_error(path: str, problem: str) -> ConfigError:
    """``params.yaml: <key path>: <problem>``, the one shape of every params mistake."""
    return ConfigError(f"{PARAMS_FILE}: {path}: {problem}")


class Section:
    """A mapping read key by key; ``finish()`` rejects keys nobody asked for."""

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise config_error(path, f"expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.path = path
        self._seen: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def required(self, key: str, parse: Parser) -> Any:
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            raise config_error(self.key_path(key), "missing required key")
        return parse(self.data[key], self.key_path(key))

    def optional(self, key: str, parse: Parser, default: Any = None) -> Any:
        self._seen.add(key)
        if self.data.get(key) is None:
            return default
        return parse(self.data[key], self.key_path(key))

    def section(self, key: str, *, required: bool = True) -> "Section":
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise config_error(self.key_path(key), "missing required section")
            return Section({}, self.key_path(key))
        return Section(self.data[key], self.key_path(key))

    def keys(self) -> list[str]:
        """All keys of this section, each marked as read (for user-named keys such as datasets)."""
        self._seen.update(self.data)
        return list(self.data)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._seen, key=str)
        if unknown:
            allowed = ", ".join(sorted(self._seen))
            raise config_error(self.key_path(unknown[0]), f"unknown key (allowed here: {allowed})")


# --- typed params: dataclass fields that carry their parser ------------------------------------

_PARSE = "emdata.parse"  # field metadata: the value parser
_KEY = "emdata.key"  # field metadata: the key, dotted for a key of a sub-section ("render.tile_size")
_USING = "emdata.using"  # field metadata: makes the parser from the fields read before this one


def param(parse: Parser | None = None, default: Any = dataclasses.MISSING, *, key: str | None = None,
          using: Callable[[dict[str, Any]], Parser] | None = None) -> Any:
    """A field of a source's ``Params`` read from params.yaml by :func:`read_params`.

    Without a default the key is required; ``key`` names it when it differs from the field's
    name, dotted for a key of an optional sub-section (``limits.member_mb``). ``using`` builds the
    parser from the fields declared before (a file's URL from ``base_url``)."""
    if (parse is None) == (using is None):
        raise TypeError("param() takes a parser or using=, not both")
    metadata = {_PARSE: parse, _KEY: key, _USING: using}
    if isinstance(default, (dict, list, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def read_params(cls: type[T], sec: Section, **given: Any) -> T:
    """``cls`` built from ``sec``: each :func:`param` field parsed from its key (or its default),
    the other fields from ``given``. Sub-sections named by dotted keys are finished here; ``sec``
    itself is finished by its owner (which may read more keys)."""
    values = dict(given)
    sections: dict[str, Section] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if _KEY not in f.metadata or f.name in given:
            continue
        parse = f.metadata[_PARSE] or f.metadata[_USING](values)
        owner, _, leaf = (f.metadata[_KEY] or f.name).rpartition(".")
        here = sec
        if owner:
            if owner not in sections:
                sections[owner] = sec.section(owner, required=False)
            here = sections[owner]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            values[f.name] = here.required(leaf, parse)
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            values[f.name] = here.optional(leaf, parse, default)
    for sub in sections.values():
        sub.finish()
    return cls(**values)


def as_fields(cls: type[T]) -> Callable[[Any, str], T]:
    """A nested mapping read into ``cls`` by :func:`read_params` (unknown keys refused)."""

    def parse(value: Any, path: str) -> T:
        sec = Section(value, path)
        out = read_params(cls, sec)
        sec.finish()
        return out

    return parse


# --- value parsers: (value, key_path) -> typed value -------------------------------------------


def as_str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise config_error(path, f"expected a non-empty string, got {value!r}")
    return value


def as_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise config_error(path, f"expected true or false, got {value!r}")
    return value


def as_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise config_error(path, f"expected a non-negative integer, got {value!r}")
    return value


def as_int_range(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(value: Any, path: str) -> int:
        number = as_int(value, path)
        if not low <= number <= high:
            raise config_error(path, f"expected an integer from {low} to {high}, got {value!r}")
        return number

    return parse


def as_fraction(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise config_error(path, f"expected a fraction from 0 to 1, got {value!r}")
    return float(value)


def as_sha256(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise config_error(path, f"expected 64 lowercase hex digits (sha256), got {value!r}")
    return value


def as_matching(pattern: re.Pattern[str], what: str) -> Callable[[Any, str], str]:
    """A string matching ``pattern`` whole; ``what`` says in words what is expected."""

    def parse(value: Any, path: str) -> str:
        text = as_str(value, path)
        if not pattern.fullmatch(text):
            raise config_error(path, f"{text!r} is not {what}")
        return text

    return parse


def as_str_list(pattern: re.Pattern[str] | None = None, what: str = "non-empty strings",
                *, empty: bool = True) -> Callable[[Any, str], tuple[str, ...]]:
    """A list of non-empty strings (each matching ``pattern`` whole, if given), as a tuple."""

    def parse(value: Any, path: str) -> tuple[str, ...]:
        ok = isinstance(value, list) and (empty or bool(value))
        ok = ok and all(isinstance(v, str) and v and (pattern is None or pattern.fullmatch(v)) for v in value)
        if not ok:
            raise config_error(path, f"expected a list of {what}, got {value!r}")
        return tuple(value)

    return parse


def as_url(value: Any, path: str) -> str:
    text = as_str(value, path)
    if not re.match(r"^https?://", text):
        raise config_error(path, f"expected an http(s) URL, got {value!r}")
    try:
        urllib.parse.urlsplit(text)  # "Invalid IPv6 URL" here, not later in urljoin
    except ValueError as exc:
        raise config_error(path, f"invalid URL {value!r} ({exc})") from None
    return text


def as_folder_url(value: Any, path: str) -> str:
    """An http(s) URL of a folder: files are joined onto it, so it must end in ``/``."""
    text = as_url(value, path)
    if not text.endswith("/"):
        raise config_error(path, "a folder URL ending in '/' is expected")
    return text


def as_triple(positive: bool) -> Callable[[Any, str], tuple[float, float, float]]:
    def parse(value: Any, path: str) -> tuple[float, float, float]:
        ok = isinstance(value, (list, tuple)) and len(value) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ok = ok and all(math.isfinite(v) and (v > 0 if positive else True) for v in value)
        if not ok:
            kind = "positive numbers" if positive else "numbers"
            raise config_error(path, f"expected three {kind} [z, y, x], got {value!r}")
        return tuple(float(v) for v in value)  # type: ignore[return-value]

    return parse


def as_int_triple(value: Any, path: str) -> tuple[int, int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise config_error(path, f"expected three positive integers [z, y, x], got {value!r}")
    return tuple(value)


def as_int_pair(value: Any, path: str) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise config_error(path, f"expected two positive integers [y, x], got {value!r}")
    return tuple(value)


def as_choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, path: str) -> str:
        if value not in choices:
            raise config_error(path, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def as_named(parse: Parser, what: str = "label names") -> Callable[[Any, str], dict[str, Any]]:
    """``{name: value}`` with names matching :data:`KEY_PATTERN` (labels), each value parsed."""

    def parse_all(value: Any, path: str) -> dict[str, Any]:
        sec = Section(value, path)
        out = {}
        for name in sec.keys():
            if not isinstance(name, str) or not KEY_PATTERN.fullmatch(name):
                raise config_error(sec.key_path(str(name)), f"{what} must match {KEY_PATTERN.pattern}")
            out[name] = parse(sec.data[name], sec.key_path(name))
        return out

    return parse_all


def as_label_values(value: Any, path: str) -> dict[str, dict[int, int]]:
    """``{label: {native value: stored value}}``, e.g. ``{mitochondria: {255: 1}}``."""
    if not isinstance(value, Mapping):
        raise config_error(path, f"expected {{label: {{native: stored}}}}, got {value!r}")
    out: dict[str, dict[int, int]] = {}
    for name, mapping in value.items():
        ok = bool(isinstance(name, str) and KEY_PATTERN.fullmatch(name) and isinstance(mapping, Mapping) and mapping)
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for pair in mapping.items() for v in pair)
        if not ok:
            raise config_error(f"{path}.{name}", "expected a label name with a mapping of integers "
                               f"{{native: stored}}, got {mapping!r}")
        out[name] = {int(k): int(v) for k, v in mapping.items()}
    return out
