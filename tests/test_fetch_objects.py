"""The shared object copy (sources/fetch/objects.py): journal, resume, bounded window, first error."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from emdata.errors import Cancelled, FetchError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.objects import JOURNAL, LEGACY_JOURNALS, copy_objects, journalled


@dataclass(frozen=True)
class Obj:
    relpath: str
    url: str


OBJECTS = [Obj(f"a/{i}.bin", f"mem://{i}") for i in range(12)]


def body(obj: Obj) -> bytes:
    return obj.url.encode() * 3


def context(tmp_path: Path, workers: int = 3) -> FetchContext:
    return FetchContext(dataset="ds", kind="test", spec={"kind": "test", "n": 1}, dest=tmp_path / "partial",
                        workers=workers)


def reader(log: list[str], fail: set[str] = frozenset()) -> Callable[[Obj], Callable[[], bytes]]:  # type: ignore[assignment]
    lock = threading.Lock()

    def start(obj: Obj) -> Callable[[], bytes]:
        def read() -> bytes:
            with lock:
                log.append(obj.relpath)
            if obj.relpath in fail:
                raise FetchError("ds", obj.url, "no answer", "try again")
            return body(obj)
        return read
    return start


def test_a_complete_copy_writes_every_object_and_no_journal(tmp_path) -> None:
    ctx, log = context(tmp_path), []
    files = copy_objects(ctx, OBJECTS, reader(log), desc="objects")
    assert sorted(log) == sorted(o.relpath for o in OBJECTS) and list(files) == [o.relpath for o in OBJECTS]
    for obj in OBJECTS:
        data = (ctx.dest / obj.relpath).read_bytes()
        assert data == body(obj) and files[obj.relpath].sha256 == hashlib.sha256(data).hexdigest()
        assert files[obj.relpath].url == obj.url and files[obj.relpath].size == len(data)
    assert not (ctx.dest / JOURNAL).exists() and not list(ctx.dest.rglob("*.tmp"))


def test_a_failed_copy_resumes_only_what_it_journalled_and_still_hashes(tmp_path) -> None:
    ctx, log = context(tmp_path, workers=1), []
    with pytest.raises(FetchError, match="no answer"):
        copy_objects(ctx, OBJECTS, reader(log, fail={"a/6.bin"}), desc="objects")
    assert log == [o.relpath for o in OBJECTS[:7]]  # one worker: no object starts after the failure
    assert journalled(ctx) == {o.relpath: len(body(o)) for o in OBJECTS[:6]}
    (ctx.dest / "a/0.bin").write_bytes(b"X" * len(body(OBJECTS[0])))  # damaged, same size
    (ctx.dest / "a/1.bin").unlink()
    with open(ctx.dest / JOURNAL, "a") as fh:
        fh.write('{"relpath": "a/7.bin", "si')  # a line cut by a kill
    log.clear()
    files = copy_objects(ctx, OBJECTS, reader(log), desc="objects")
    assert sorted(log) == sorted(["a/0.bin", "a/1.bin", *(o.relpath for o in OBJECTS[6:])])
    assert all((ctx.dest / o.relpath).read_bytes() == body(o) for o in OBJECTS) and len(files) == len(OBJECTS)


def test_another_identity_or_spec_resumes_nothing(tmp_path) -> None:
    ctx, log = context(tmp_path), []
    with pytest.raises(FetchError):
        copy_objects(ctx, OBJECTS, reader(log, fail={"a/11.bin"}), desc="objects", identity={"crop": 1})
    assert journalled(ctx, {"crop": 1}) and not journalled(ctx, {"crop": 2}) and not journalled(ctx)
    other = FetchContext(dataset="ds", kind="test", spec={"kind": "test", "n": 2}, dest=ctx.dest)
    assert not journalled(other, {"crop": 1})
    log.clear()
    copy_objects(ctx, OBJECTS, reader(log), desc="objects", identity={"crop": 2})
    assert sorted(log) == sorted(o.relpath for o in OBJECTS)


def test_the_window_bounds_the_objects_in_flight_and_started_ones_are_stored(tmp_path) -> None:
    ctx = context(tmp_path, workers=2)
    started: list[str] = []
    live, peak, lock = [0], [0], threading.Lock()

    def start(obj: Obj) -> Callable[[], bytes]:
        started.append(obj.relpath)
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def read() -> bytes:
            with lock:
                live[0] -= 1
            if obj.relpath == "a/3.bin":
                raise FetchError("ds", obj.url, "gone", "try again")
            return body(obj)
        return read

    with pytest.raises(FetchError, match="gone"):
        copy_objects(ctx, OBJECTS, start, desc="objects", window=5)
    assert peak[0] <= 5
    # Every object started before the failure was noticed is stored (its read was under way).
    assert all((ctx.dest / rel).is_file() for rel in started if rel != "a/3.bin")
    assert set(journalled(ctx)) == {rel for rel in started if rel != "a/3.bin"}


def test_the_first_real_failure_is_raised_not_a_cancelled_one(tmp_path) -> None:
    ctx, cancel = context(tmp_path, workers=4), threading.Event()
    gate = threading.Barrier(4, timeout=10)

    def start(obj: Obj) -> Callable[[], bytes]:
        def read() -> bytes:
            index = int(obj.relpath.split("/")[1].split(".")[0])
            if index < 4:
                gate.wait()  # all four in flight at once
            if index == 2:
                raise FetchError("ds", obj.url, "the real failure", "try again")
            if index < 4:
                assert cancel.wait(10)
                raise Cancelled("ds", "fetch", "stopped")
            return body(obj)
        return read

    with pytest.raises(FetchError, match="the real failure") as failed:
        copy_objects(ctx, OBJECTS, start, desc="objects", cancel=cancel)
    assert not isinstance(failed.value, Cancelled) and cancel.is_set()
    assert not any((ctx.dest / o.relpath).exists() for o in OBJECTS[4:])  # nothing started after it
    assert json.loads((ctx.dest / JOURNAL).read_text().splitlines()[0])["spec"] == {"kind": "test", "n": 1}


def test_journals_of_earlier_versions_are_removed_when_a_copy_starts(tmp_path) -> None:
    """An older emdata's partial folder (ome_zarr_s3's chunk journal, precomputed's .crop.json) would
    otherwise be published into data/raw with the files, listed nowhere."""
    ctx, log = context(tmp_path), []
    ctx.dest.mkdir(parents=True)
    assert set(LEGACY_JOURNALS) == {".emdata-chunks.jsonl", ".crop.json"}
    for name in LEGACY_JOURNALS:
        (ctx.dest / name).write_text('{"an": "older journal"}\n')
    with pytest.raises(FetchError):  # the copy is interrupted: the old journals are gone all the same
        copy_objects(ctx, OBJECTS, reader(log, fail={"a/0.bin"}), desc="objects")
    assert not any((ctx.dest / name).exists() for name in LEGACY_JOURNALS)
    copy_objects(ctx, OBJECTS, reader(log), desc="objects")
    left = sorted(p.relative_to(ctx.dest).as_posix() for p in ctx.dest.rglob("*") if p.is_file())
    assert left == sorted(o.relpath for o in OBJECTS)
