"""The exception hierarchy. Every error a user can cause or meet is one of these.

The CLI prints ``emdata: error: <message>`` on one line and exits with ``exit_code``;
``EMDATA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations


class EmdataError(Exception):
    """Base of all emdata errors."""

    exit_code = 1


class ConfigError(EmdataError):
    """params.yaml or a command-line argument is wrong (unknown dataset, kind or key; bad value)."""

    exit_code = 2


class SourceError(EmdataError):
    """A problem with a dataset's source; the message names the dataset and the URL or path."""

    exit_code = 3

    def __init__(self, dataset: str, where: str, problem: str, hint: str = "") -> None:
        self.dataset = dataset
        self.where = where
        self.problem = problem
        self.hint = hint
        text = f"{dataset}: {where}: {problem}"
        super().__init__(f"{text}; {hint}" if hint else text)


class FetchError(SourceError):
    """Network or HTTP failure after bounded retries; ``status`` is the HTTP status when a server
    answered one (404, 503...), None otherwise: callers test it, never the message text."""

    exit_code = 4

    def __init__(self, dataset: str, where: str, problem: str, hint: str = "", *, status: int | None = None) -> None:
        super().__init__(dataset, where, problem, hint)
        self.status = status


class IntegrityError(FetchError):
    """Bytes arrived but do not match the expected size or checksum."""

    exit_code = 5


class FormatError(SourceError):
    """Bytes are present but are not what the source declared (corrupt TIFF, wrong dtype...)."""

    exit_code = 6


class OutputError(SourceError):
    """Writing an output failed (full disk, I/O error); the previous output is left as it was."""

    exit_code = 10


class NotBuiltError(EmdataError):
    """An output a command needs does not exist yet (not fetched, normalized or pulled)."""

    exit_code = 7


class AccessError(EmdataError, IndexError):
    """A region or patch lies outside the volume."""

    exit_code = 8


class ClusterError(EmdataError):
    """A Dask cluster could not be reached or lost work beyond its retries (normalize --scheduler,
    run_tiled(client=...)); what finished is kept in the ledger and a rerun resumes from it."""

    exit_code = 11


class Cancelled(FetchError):
    """A transfer stopped before its next attempt because another transfer of the same fetch failed
    for good (``FetchContext.map`` with ``cancel``); that other failure is the one reported."""


def refetch_hint(dataset: str) -> str:
    """What to do about damaged fetched bytes: a bare ``emdata fetch`` finds the copy complete
    (its sizes and recorded hashes match) and answers "up to date", so the copy must go first."""
    return (f"delete data/raw/{dataset} and run `emdata fetch {dataset}`; if the new copy fails the same way, "
            "the source's copy is damaged")
