"""core.atomic: the one write-then-rename (atomic_output), its halves (commit, discard), the hashing
stream writer, and the stale temporaries every name in use leaves for the next run to remove."""
import hashlib
import os

import pytest

from emdata.core.atomic import (
    atomic_output,
    commit,
    discard,
    stale_temporaries_in,
    temporary_path,
    write_bytes_atomic,
    write_stream,
)
from emdata.errors import OutputError
from emdata.params.layout import Layout
from emdata.stages.normalize.ledger import Ledger
from emdata.stages.workspace import UNFINISHED, drop_unfinished, remove_stale_temporaries

OTHER_PID = 2**22 + 17  # above the default pid_max: never this process


def test_write_stream_hashes_and_renames(tmp_path):
    size, sha = write_stream(tmp_path / "a" / "f.bin", iter([b"abc", b"de"]))
    assert (size, sha) == (5, hashlib.sha256(b"abcde").hexdigest())
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"abcde"
    assert os.listdir(tmp_path / "a") == ["f.bin"]


def test_a_failing_reader_leaves_no_file_and_keeps_its_error(tmp_path):
    def blocks():
        yield b"x"
        raise ValueError("source broke")
    (tmp_path / "f.bin").write_bytes(b"old")
    with pytest.raises(ValueError, match="source broke"):
        write_stream(tmp_path / "f.bin", blocks(), dataset="ds")
    assert (tmp_path / "f.bin").read_bytes() == b"old"  # the old file is kept whole
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_output_removes_its_temporary_on_error(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not target.exists() and not temporary_path(target).exists()


def test_a_write_failure_names_the_dataset_and_the_final_file(tmp_path):
    (tmp_path / "plain").write_bytes(b"")  # a file where a folder should be: mkdir fails
    with pytest.raises(OutputError, match=r"ds: .*plain/f\.bin"):
        write_stream(tmp_path / "plain" / "f.bin", [b"x"], dataset="ds")


def test_a_link_planted_at_the_temporary_name_is_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    target = tmp_path / "d" / "f.json"
    target.parent.mkdir()
    temporary_path(target).symlink_to(outside)
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and outside.read_bytes() == b"keep" and not target.is_symlink()


def test_commit_names_the_final_file_and_discard_never_raises(tmp_path):
    with pytest.raises(OutputError, match=r"ds: .*out\.bin: cannot write it"):
        commit(tmp_path / "missing.tmp", tmp_path / "out.bin", dataset="ds")
    discard(tmp_path / "missing.tmp")
    discard(tmp_path)  # a folder: unlink fails, and discard says nothing


def test_stale_temporaries_in_a_tree_are_other_processes_only(tmp_path):
    names = [f"a/.x.blk.{OTHER_PID}.tmp", f"a/b/.y.{OTHER_PID}.tmp", f"a/.z.{os.getpid()}.tmp", "a/x.blk",
             f"a/x.{OTHER_PID}.tmp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert stale_temporaries_in(tmp_path) == [tmp_path / names[0], tmp_path / names[1]]


def test_every_temporary_name_in_use_is_removed_by_the_next_run(tmp_path):
    """The files and the raw folder are replaced through core.atomic's names; an older emdata's
    ``.partial/<key>.old`` goes too; in a complete partial fetch, everything unfinished that is not listed."""
    paths = Layout(tmp_path).paths("ds")
    stale = [p.with_name(f".{p.name}.{OTHER_PID}.tmp") for p in (paths.record, paths.processed, paths.hash_state,
                                                                 paths.input_stamp)]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    old_raw = paths.raw.with_name(f".ds.{OTHER_PID}.tmp")  # fetch killed between its two renames
    legacy = paths.partial.with_name("ds.old")
    for folder in (old_raw, legacy):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "f.tif").write_text("x")
    mine = temporary_path(paths.record)
    mine.write_text("x")  # this process's own temporary is not stale
    remove_stale_temporaries(paths)
    assert not any(os.path.lexists(p) for p in [*stale, old_raw, legacy]) and mine.exists()

    partial = paths.partial
    unfinished = ["f.tif.part", "f.tif.part.validator", f".g.tif.{OTHER_PID}.tmp", "h.tif.tmp",
                  "crop.zarr/.zarray.__lock"]
    assert all(name.endswith(UNFINISHED) for name in unfinished)
    for name in [*unfinished, "f.tif", "crop.zarr/0.0.0"]:
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_text("x")
    drop_unfinished(partial, {"f.tif", "crop.zarr/0.0.0"})
    assert sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*") if p.is_file()) == \
        ["crop.zarr/0.0.0", "f.tif"]


def test_a_distributed_normalize_ledger_removes_the_tiles_a_killed_run_was_writing(tmp_path):
    Ledger(tmp_path / "l", "fingerprint").stage("raw", 0, {"stats": None, "chunks": []})
    half = Ledger(tmp_path / "l", "fingerprint").staged("raw", 1).with_name(f".00000001.blk.{OTHER_PID}.tmp")
    half.write_bytes(b"half a tile")
    ledger = Ledger(tmp_path / "l", "fingerprint")
    assert not half.exists() and ("raw", 0) in ledger.done
    assert sorted(p.name for p in (tmp_path / "l").rglob("*") if p.is_file()) == ["00000000.blk", "ledger.jsonl"]
