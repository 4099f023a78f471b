"""The last step of normalize: a checked temporary HDF5 takes its name, with its record and chunk index."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

from emdata.core.atomic import commit, discard, json_bytes, sync_file, temporary_path, write_error, write_new
from emdata.h5 import chunk_index
from emdata.h5.metadata import build_record
from emdata.params.config import Config


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """This process's temporary for ``out``: removed when anything fails before :func:`publish`
    gives it the final name (so an interrupted normalize never leaves a file that looks done)."""
    tmp = temporary_path(out)
    try:
        yield tmp
    except BaseException:
        discard(tmp)
        raise


def publish(cfg: Config, key: str, tmp: Path, out: Path) -> None:
    """Give the HDF5, its chunk index and its record their names together, or leave the dataset
    "not normalized".

    The record and the chunk index (:mod:`emdata.h5.chunk_index`) are built from the checked
    temporary file first; the old record goes before the new HDF5 takes its name and the record
    comes last, so an interruption leaves an HDF5 without a record (which ``list`` and ``verify``
    report as not normalized), never a new HDF5 beside an old record or an old index.
    """
    # The HDF5's flush to disk (about 1 s per GiB here) runs while the record and the index read it.
    flushing = ThreadPoolExecutor(1, thread_name_prefix="emdata-fsync")
    flushed = flushing.submit(sync_file, tmp)
    flushing.shutdown(wait=False)
    try:
        record = build_record(cfg, key, tmp)
    except BaseException:
        wait([flushed])  # done before the caller removes the temporary; the first error stays the one raised
        raise
    _wait(flushed, out, key)
    record_path = cfg.record_path(key)
    index_path = chunk_index.index_path_for(record_path)
    # Three files renamed in one order, so not three atomic_output blocks (those would rename each
    # file when its block ends): the temporaries, the flush-and-rename and the cleanup are core.atomic's.
    staged, staged_index = temporary_path(record_path), temporary_path(index_path)
    try:
        try:
            record_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, record_path, key) from exc
        write_new(staged, json_bytes(record), dataset=key, final=record_path)
        write_new(staged_index, chunk_index.build(tmp, file_name=out.name, file_sha256=record["file_sha256"]),
                  dataset=key, final=index_path)
        record_path.unlink(missing_ok=True)
        commit(tmp, out, dataset=key, fsync=False)  # flushed above
        commit(staged_index, index_path, dataset=key)
        commit(staged, record_path, dataset=key)
    finally:
        discard(staged)
        discard(staged_index)


def _wait(flushed: Future, out: Path, key: str) -> None:
    """The flush's own failure (EIO, a full disk at write-back) as the one-line error of ``out``."""
    try:
        flushed.result()
    except OSError as exc:
        raise write_error(exc, out, key) from exc
