"""Old spellings of the read API that still work for a while, with a DeprecationWarning.

One name per idea: an argument or attribute that was renamed keeps its old name as an alias that
warns and means exactly what it meant; a renamed name never takes a new meaning silently.
"""

from __future__ import annotations

import warnings
from typing import Any


def renamed(owner: str, old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``owner``'s ``old`` is now called ``new`` (it still works, for now)."""
    warnings.warn(f"{owner}: {old} is deprecated, use {new} (same meaning)", DeprecationWarning,
                  stacklevel=stacklevel)


def pick(owner: str, old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value of a renamed keyword: ``new_value``, else the deprecated ``old_value``, else ``default``."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"{owner}: pass {new}= only ({old}= is its deprecated name)")
    renamed(owner, f"{old}=", f"{new}=", stacklevel=4)
    return old_value


class Alias:
    """A read-only attribute under its old name, warning once per access."""

    def __init__(self, new: str) -> None:
        self.new = new

    def __set_name__(self, owner: type, name: str) -> None:
        self.owner, self.old = owner.__name__, name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        renamed(self.owner, f".{self.old}", f".{self.new}")
        return getattr(obj, self.new)
