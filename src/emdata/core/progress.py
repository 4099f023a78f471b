"""Progress reporting: a tqdm bar on a terminal, a few plain log lines elsewhere (CI, DVC logs).

tqdm comes with ``emdata[pipeline]``; without it (the light, read-only install) a terminal gets
the log lines too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("emdata")


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _tqdm() -> Any:
    """tqdm's bar class, or None in the light install (no ``emdata[pipeline]``): then log lines only."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Counts units of work; draws a bar on a TTY, else logs every quarter."""

    def __init__(self, total: int | None, desc: str, unit: str = "B") -> None:
        self.total = total
        self.desc = desc
        self.done = 0
        self._next_quarter = 1
        self._bar = None
        tqdm = _tqdm() if _interactive() else None
        if tqdm is not None:
            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                             unit_divisor=1024, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.total:
            while self._next_quarter <= 4 and self.done * 4 >= self.total * self._next_quarter:
                log.info("%s: %d%%", self.desc, 25 * self._next_quarter)
                self._next_quarter += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
