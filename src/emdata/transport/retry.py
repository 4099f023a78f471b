"""The retry policy of the HTTP client: how often, how long to wait, how slow a body may be.

Connection errors, 429 and 5xx are retried a bounded number of times with exponential backoff and
jitter, honouring ``Retry-After``. A body that arrives slower than a minimum rate counts as a
failed attempt, and the next one resumes it: a server trickling a byte a second fails a download
within the retry budget (6 attempts of 10 s plus the waits between them: under 90 s with the
defaults).

Environment (read by :meth:`RetryPolicy.from_env`, which the client uses when given no policy):

``EMDATA_READ_TIMEOUT``
    Seconds to wait for the next bytes of a response before the attempt counts as failed
    (default 60).
``EMDATA_MIN_RATE`` and ``EMDATA_RATE_WINDOW``
    A response body must bring at least ``EMDATA_MIN_RATE`` bytes per second on average over
    each ``EMDATA_RATE_WINDOW`` seconds (defaults 1024 and 10), else the attempt counts as
    stalled and the next one resumes; ``EMDATA_MIN_RATE=0`` turns the check off.

A value that is not a number in ASCII digits in range (a positive one; the minimum rate may be 0)
is refused when the policy is made.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

from emdata.core.numbers import ascii_decimal
from emdata.errors import ConfigError

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
READ_TIMEOUT_ENV = "EMDATA_READ_TIMEOUT"
MIN_RATE_ENV = "EMDATA_MIN_RATE"
RATE_WINDOW_ENV = "EMDATA_RATE_WINDOW"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds for one request: how often, how long to wait, how long to wait for bytes."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # A body must average min_rate bytes/s over every rate_window seconds (0: no minimum). A
    # trickle then costs an attempt of rate_window seconds, not hours: 6 x 10 s + waits < 90 s.
    min_rate: float = 1024.0
    rate_window: float = 10.0
    # A host that has not answered once in this client (refused, no route, no connection) is given
    # up when the next try could end later than this after the first began: unreachable hosts
    # fail in seconds, not after every try with its connect timeout (6 x 10 s + waits).
    unreachable_after: float = 25.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with equal jitter: half fixed, half random."""
        delay = min(self.max_delay, self.base_delay * (2 ** attempt))
        return delay / 2 + rng.uniform(0, delay / 2)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> RetryPolicy:
        """The default policy, with ``read_timeout``, ``min_rate`` and ``rate_window`` from the
        environment (``EMDATA_READ_TIMEOUT``, ``EMDATA_MIN_RATE``, ``EMDATA_RATE_WINDOW``) when set."""
        environ = os.environ if environ is None else environ
        for name, key, what, zero in ((READ_TIMEOUT_ENV, "read_timeout", "a positive number of seconds "
                                       "(such as 60 or 2.5)", False),
                                      (MIN_RATE_ENV, "min_rate", "a number of bytes per second "
                                       "(such as 1024; 0 turns the check off)", True),
                                      (RATE_WINDOW_ENV, "rate_window", "a positive number of seconds "
                                       "(such as 10)", False)):
            value = environ.get(name, "")
            if value.strip() and key not in fields:
                number = ascii_decimal(value)
                if number is None or not math.isfinite(number) or (number <= 0 and not (zero and number == 0)):
                    raise ConfigError(f"{name}={value!r}: expected {what}; unset it for the default "
                                      f"{getattr(cls, key):g}")
                fields[key] = number
        return cls(**fields)


class Retry(Exception):
    """This attempt failed in a way worth another try (``status``: the HTTP status, if any).

    Raised by an attempt and caught by the client's retry loop; it never leaves the client.
    """

    def __init__(self, reason: str, wait: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.wait = wait
        self.status = status


class RateGuard:
    """Fails an attempt whose body averages less than ``policy.min_rate`` bytes/s over a window.

    A read timeout alone never fires on a server that sends a byte every second; this does, after
    ``rate_window`` seconds, and the retry resumes from what arrived.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.rate, self.window = policy.min_rate, policy.rate_window
        self.start, self.got = time.monotonic(), 0

    @property
    def deadline(self) -> float:
        """When the current window ends (a reader stops filling its buffer then, to check)."""
        return self.start + self.window if self.rate > 0 else math.inf

    def update(self, nbytes: int) -> None:
        self.got += nbytes
        now = time.monotonic()
        if self.rate <= 0 or now < self.deadline:
            return
        if self.got < self.rate * (now - self.start):
            raise Retry(f"the transfer stalled ({self.got} bytes in {now - self.start:.1f} s, under the minimum "
                        f"of {self.rate:g} bytes/s over {self.window:g} s; {MIN_RATE_ENV} sets it)")
        self.start, self.got = now, 0
