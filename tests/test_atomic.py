"""core.atomic: the one write-then-rename (atomic_output) and the hashing stream writer."""
import os, pytest
from emdata.core.atomic import atomic_output, write_stream, temporary_path
from emdata.errors import OutputError

def test_write_stream_hashes_and_renames(tmp_path):
    size, sha = write_stream(tmp_path / "a" / "f.bin", iter([b"abc", b"de"]))
    import hashlib
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
