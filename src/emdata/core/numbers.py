"""Numbers read from the wire, from files and from the environment: one way, ASCII digits only.

``str.isdigit`` is true for ``"²"`` and ``int`` and ``float`` accept ``"١٢"`` (Arabic-Indic digits)
and ``"1_000"``; a server, a file header or a variable that writes such a thing is answering
nonsense, and must get the same "not a number" as any other garbage, never a crash or a guess.
"""

from __future__ import annotations

import re

MAX_DIGITS = 30  # longer is garbage, and int() refuses strings past 4300 digits anyway
_INT = re.compile(r"[0-9]{1,%d}" % MAX_DIGITS)
_DECIMAL = re.compile(r"(?:[0-9]{1,%d}(?:\.[0-9]{0,%d})?|\.[0-9]{1,%d})" % ((MAX_DIGITS,) * 3))
_BLANKS = " \t"  # what HTTP and shell values may carry around a number (not Unicode spaces)


def ascii_int(text: object) -> int | None:
    """The non-negative integer ``text`` spells in ASCII digits (blanks around allowed), else None."""
    if not isinstance(text, str):
        return None
    text = text.strip(_BLANKS)
    return int(text) if _INT.fullmatch(text) else None


def ascii_decimal(text: object) -> float | None:
    """The non-negative number ``text`` spells as ASCII ``123``, ``1.5`` or ``.5``, else None."""
    if not isinstance(text, str):
        return None
    text = text.strip(_BLANKS)
    return float(text) if _DECIMAL.fullmatch(text) else None
