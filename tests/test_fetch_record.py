"""The fetch record: one definition of "fetched", specs compared as JSON sees them."""

from __future__ import annotations

import numpy as np
import pytest

from emdata.errors import ConfigError
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.record import FetchedFile, FetchRecord, fetched, safe_relpath


def test_a_spec_with_tuples_is_fetched_after_a_round_trip_through_json(tmp_path) -> None:
    spec = {"kind": "toy", "roi": (0, 64, 128), "level": "s2"}  # what a Params.to_dict() may return
    ctx = FetchContext(dataset="d", kind="toy", spec=spec, dest=tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.bin").write_bytes(b"12345")
    record = ctx.record({"a/b.bin": FetchedFile("http://x/b", 5)}, extra={"count": np.int64(3)})
    record.write(tmp_path)
    assert FetchRecord.load(tmp_path).extra == {"count": 3}
    assert fetched(tmp_path, spec) is not None
    assert fetched(tmp_path, {**spec, "level": "s3"}) is None
    (tmp_path / "a" / "b.bin").write_bytes(b"1234")
    assert fetched(tmp_path, spec) is None  # a file of another size


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "source.json", "a\nb", "", "."])
def test_unsafe_relative_paths_are_refused(name) -> None:
    with pytest.raises(ConfigError):
        safe_relpath(name)


def test_hash_state_rehashes_only_files_whose_stat_changed(tmp_path, monkeypatch) -> None:
    import hashlib
    import os

    import emdata.sources.fetch.record as fr

    folder, state_path = tmp_path / "raw", tmp_path / "state" / "d.json"
    folder.mkdir()
    data = {"a.bin": b"alpha" * 7, "b/c.bin": b"gamma" * 11}
    files = {}
    for name, payload in data.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(payload)
        files[name] = FetchedFile("http://x/" + name, len(payload), hashlib.sha256(payload).hexdigest())
    spec = {"kind": "toy"}
    FetchRecord("d", "toy", spec, files).write(folder)
    hashed: list[str] = []
    real = fr.sha256_file
    monkeypatch.setattr(fr, "sha256_file", lambda p: hashed.append(p.name) or real(p))

    fr.HashState(state_path).remember_record(folder, FetchRecord.load(folder))
    assert fetched(folder, spec, state=fr.HashState(state_path)) is not None
    assert hashed == []  # verified at fetch time, unchanged since: no hashing

    flipped = bytearray(data["b/c.bin"])
    flipped[3] ^= 1
    st = os.stat(folder / "b/c.bin")
    (folder / "b/c.bin").write_bytes(bytes(flipped))
    os.utime(folder / "b/c.bin", ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime
    assert fetched(folder, spec) is not None  # sizes alone cannot tell
    assert fetched(folder, spec, state=fr.HashState(state_path)) is None
    assert hashed == ["c.bin"]  # only the changed file was read
    problems = FetchRecord.load(folder).problems(folder, state=fr.HashState(state_path))
    assert problems == ["b/c.bin does not match its recorded sha256 (its bytes changed after the fetch)"]

    (folder / "b/c.bin").write_bytes(data["b/c.bin"])  # restored (as dvc checkout would): hashed once
    hashed.clear()
    assert fetched(folder, spec, state=fr.HashState(state_path)) is not None
    assert fetched(folder, spec, state=fr.HashState(state_path)) is not None
    assert hashed == ["c.bin"]

    state_path.write_text("{not json")  # a damaged cache costs a re-hash, nothing else
    hashed.clear()
    assert fetched(folder, spec, state=fr.HashState(state_path)) is not None
    assert sorted(hashed) == ["a.bin", "c.bin"]


def test_a_group_digest_is_the_sha256_of_its_files_sorted_lines() -> None:
    import hashlib

    from emdata.sources.fetch.digests import group_digest

    files = {"z/s0/1.0": FetchedFile("s3://b/c/s0/1.0", 7, "bb"), "z/s0/.zarray": FetchedFile("s3://b/c/s0/.zarray", 3, "aa")}
    lines = "z/s0/.zarray 3 aa\nz/s0/1.0 7 bb\n"
    assert group_digest(files.items()) == hashlib.sha256(lines.encode()).hexdigest()


def test_group_digests_are_checked_against_the_recorded_files_and_their_bytes(tmp_path) -> None:
    """A record's ``array_digests``: the group of each URL is the files whose URL lies under it."""
    import hashlib

    from emdata.sources.fetch.digests import group_digests, group_problems

    data = {"z/a/0": b"alpha", "z/a/.zarray": b"{}", "z/ab/0": b"beta"}
    files = {rel: FetchedFile(f"s3://b/c/{rel[2:]}", len(v), hashlib.sha256(v).hexdigest()) for rel, v in data.items()}
    groups = group_digests(files, ["s3://b/c/a", "s3://b/c/ab"])
    assert groups["s3://b/c/a"] != groups["s3://b/c/ab"]  # "a" is not a folder of "ab/0"
    record = FetchRecord("d", "toy", {}, files, {"array_digests": groups})
    on_disk = {rel: f.sha256 for rel, f in files.items()}
    assert group_problems(record, on_disk) == []

    changed = {**on_disk, "z/a/0": hashlib.sha256(b"alphx").hexdigest()}
    (problem,) = group_problems(record, changed)
    assert problem.startswith("s3://b/c/a: ") and "z/a/0" in problem and "\n" not in problem

    edited = FetchRecord("d", "toy", {}, files, {"array_digests": {**groups, "s3://b/c/ab": "0" * 64}})
    (problem,) = group_problems(edited, on_disk)
    assert problem.startswith("s3://b/c/ab: ") and "0" * 64 in problem and "\n" not in problem
    assert len(group_problems(FetchRecord("d", "toy", {}, files, {"array_digests": ["x"]}), on_disk)) == 1
