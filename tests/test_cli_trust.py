"""Issue 20, items 12, 14 and 15: records validated on read, atomic writes that name what failed,
temporaries of killed runs cleaned, no writing through symlinked data folders, and the CLI's one
error boundary (every exception one line naming the command; EMDATA_DEBUG; Ctrl-C)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from emdata.params.config import Config
from emdata.sources.dataset import resolve_dataset
from emdata.errors import FormatError, OutputError
from emdata.sources.fetch.record import FetchRecord
from emdata.core import atomic
from emdata.h5 import hdf5
from emdata.h5.metadata import read_record, record_problem
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.fetch import fetch_dataset
from emdata.stages.workspace import drop_unfinished

DS = "epfl_mito_train"
OTHER_PID = 2**22 + 17  # above the default pid_max: never this process


@pytest.fixture
def built(epfl_project: Config) -> Config:
    """epfl_mito_train fetched and normalized (17 x 29 x 43 with one label)."""
    fetch_dataset(epfl_project, DS)
    normalize_dataset(epfl_project, DS)
    return epfl_project


def cli(cwd: Path, *args: str, prelude: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``emdata ARGS`` in a fresh interpreter; ``prelude`` runs first (to plant a fault)."""
    code = f"{prelude}\nimport sys\nfrom emdata.cli import main\nsys.argv = ['emdata', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode > 0 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("emdata: error: "), lines
    return lines[0]


# -- item 12: a record of the wrong shape ------------------------------------------------------------

def _good(cfg: Config) -> dict[str, Any]:
    return json.loads(cfg.record_path(DS).read_text())


def test_a_built_record_has_the_shape_readers_expect(built: Config) -> None:
    assert record_problem(_good(built), DS) is None
    assert read_record(built, DS)["dataset"] == DS


@pytest.mark.parametrize("change, words", [
    (lambda r: r.pop("statistics"), "field statistics is missing"),
    (lambda r: r["statistics"].pop("mean"), "field statistics.mean is missing"),
    (lambda r: r.update(shape="17x29x43"), 'field shape is "17x29x43", not a list of 3 whole numbers'),
    (lambda r: r.update(shape=[17, 29]), "not a list of 3 whole numbers"),
    (lambda r: r.update(voxel_size_nm=[5, True, 5]), "field voxel_size_nm is [5, true, 5], not a list of 3 numbers"),
    (lambda r: r.update(file_sha256=5), "field file_sha256 is 5, not a sha256"),
    (lambda r: r.update(labels=["mitochondria"]), "field labels is [\"mitochondria\"], not a JSON object"),
    (lambda r: r["labels"]["mitochondria"].pop("array_sha256"), "field labels.mitochondria.array_sha256 is missing"),
    (lambda r: r["statistics"].update(percentiles={"p0.1": 0}), "field statistics.percentiles.p99.9 is missing"),
    (lambda r: r.update(dataset="epfl_other"), "it is the record of another dataset"),
    (lambda r: r.update(layout="collection"), "field n_images is missing"),
])
def test_a_record_of_the_wrong_shape_names_the_field(built: Config, change: Any, words: str) -> None:
    record = _good(built)
    change(record)
    built.record_path(DS).write_text(json.dumps(record))
    with pytest.raises(FormatError) as err:
        read_record(built, DS)
    text = str(err.value)
    assert "\n" not in text and words in text, text
    assert text.startswith(f"{DS}: {built.record_path(DS)}: the metadata record is damaged (")
    assert text.endswith(f"run `emdata normalize {DS}` (or `dvc checkout data/metadata/{DS}.json`)")


def test_optional_parts_of_a_record_may_be_absent_or_null(built: Config) -> None:
    record = _good(built)
    record["statistics"]["percentiles"] = None  # float volumes have no exact percentiles
    record.update(accession=None, doi=None, labels={})
    assert record_problem(record, DS) is None
    assert record_problem([], DS) == "it is [], not a JSON object"


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '"just a string"', "{\"a\": 1"])
def test_records_that_are_not_objects_or_nest_too_deep_are_damaged(built: Config, text: str) -> None:
    built.record_path(DS).write_text(text)
    with pytest.raises(FormatError, match="the metadata record is damaged"):
        read_record(built, DS)


@pytest.mark.parametrize("command", ["info", "verify", "summarize"])
def test_the_commands_say_which_field_is_wrong(built: Config, command: str) -> None:
    record = _good(built)
    record["statistics"] = {"min": 0}
    built.record_path(DS).write_text(json.dumps(record))
    line = one_line(cli(built.root, *([command] if command == "summarize" else [command, DS])))
    assert line.startswith(f"emdata: error: {DS}: ") and "field statistics.max is missing" in line


def test_a_collection_record_is_checked_by_its_own_shape(tmp_path: Path) -> None:
    from emdata.params.config import load_config
    from emdata.testing.lightmycells import REPLICA, lightmycells_dataset

    import yaml

    with REPLICA.start(tmp_path / "replica") as lmc:
        root = tmp_path / "p"
        root.mkdir()
        params = {"normalize": {"chunks": [8, 16, 16], "image_chunks": [16, 32]},
                  "datasets": {"lmc": lightmycells_dataset(lmc.share_url, 1)}}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        cfg = load_config(root)
        fetch_dataset(cfg, "lmc")
        normalize_dataset(cfg, "lmc")
    record = read_record(cfg, "lmc")
    assert record["layout"] == "collection"
    assert "lmc: " in cli(root, "info", "lmc").stdout
    role = next(iter(record["roles"]))
    record["roles"][role]["count"] = "two"
    assert record_problem(record, "lmc") == f'field roles.{role}.count is "two", not a whole number >= 0'


def test_fetch_state_files_nested_too_deep_count_as_damaged(built: Config) -> None:
    """source.json and the hash cache are read the same careful way: damaged means fetch again."""
    deep = "[" * 100_000 + "]" * 100_000
    (built.raw_dir(DS) / "source.json").write_text(deep)
    built.hash_state_path(DS).write_text(deep)
    result = fetch_dataset(built, DS)
    assert not result.up_to_date and FetchRecord.load(built.raw_dir(DS)) is not None


# -- item 14: atomic writes, temporaries, links ----------------------------------------------------------

class _FullDisk:
    """``open`` whose files take no bytes: writes fail with ENOSPC, as on a full disk."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        self.opened.append(os.fspath(path))
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115 - returned to a with block

        def write(data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        fh.write = write  # type: ignore[method-assign]
        return fh


def test_a_full_disk_while_writing_source_json_names_the_dataset_and_the_file(tmp_path, monkeypatch) -> None:
    full = _FullDisk()
    monkeypatch.setattr(atomic, "open", full, raising=False)
    record = FetchRecord("some_set", "epfl", {"kind": "epfl"})
    with pytest.raises(OutputError) as err:
        record.write(tmp_path)
    assert str(err.value) == (f"some_set: {tmp_path / 'source.json'}: cannot write it (No space left on device); "
                              "free some disk space and run again")
    assert err.value.exit_code == 10 and full.opened == [str(tmp_path / f".source.json.{os.getpid()}.tmp")]
    assert os.listdir(tmp_path) == []  # the temporary is gone


def test_without_a_dataset_a_failed_write_is_an_oserror_naming_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "open", _FullDisk(), raising=False)
    with pytest.raises(OSError) as err:
        atomic.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "x.json")


def test_a_full_disk_while_normalize_publishes_names_the_record_and_keeps_the_old_outputs(built, monkeypatch) -> None:
    before = {p: p.read_bytes() for p in (built.processed_path(DS), built.record_path(DS))}
    monkeypatch.setattr(atomic, "open", _FullDisk(), raising=False)
    with pytest.raises(OutputError) as err:
        normalize_dataset(built, DS)
    assert str(err.value).startswith(f"{DS}: {built.record_path(DS)}: cannot write it (No space left on device)")
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in built.root.rglob("*.tmp")]


def test_hdf5_create_that_cannot_even_open_the_file_is_one_output_error(tmp_path) -> None:
    hook = sys.unraisablehook
    with pytest.raises(OutputError, match="some_set: .*missing/x.h5"):
        with hdf5.create(tmp_path / "missing" / "x.h5", "some_set"):
            pass
    assert sys.unraisablehook is hook


def test_stale_temporaries_are_those_of_other_processes(tmp_path) -> None:
    path = tmp_path / "a.json"
    for name in (f".a.json.{OTHER_PID}.tmp", f".a.json.{os.getpid()}.tmp", ".a.json.x.tmp", f".a.json.json.{OTHER_PID}.tmp",
                 f"a.json.{OTHER_PID}.tmp", f".b.json.{OTHER_PID}.tmp"):
        (tmp_path / name).write_text("x")
    assert atomic.stale_temporaries(path) == [tmp_path / f".a.json.{OTHER_PID}.tmp"]
    assert atomic.stale_temporaries(tmp_path / "nowhere" / "a.json") == []


def test_unfinished_files_of_a_complete_fetch_are_dropped_unless_listed(tmp_path) -> None:
    for name in ("a.tif", "sub/b.tif.part", "sub/.c.png.123.tmp", "listed.tmp", ".source.json.9.tmp", "journal.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    drop_unfinished(tmp_path, {"a.tif", "listed.tmp"})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        ["a.tif", "journal.jsonl", "listed.tmp"]


def _plant(paths: list) -> None:
    """Temporaries as a killed process (another pid) leaves them."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")


def test_temporaries_of_killed_runs_are_removed_and_never_published(epfl_project: Config) -> None:
    cfg = epfl_project
    partial = cfg.partial_dir(DS)
    partial.mkdir(parents=True)
    (partial / ".spec.json").write_text(json.dumps(resolve_dataset(cfg, DS).source.to_dict()))  # a resumable fetch
    _plant([partial / f".source.json.{OTHER_PID}.tmp", partial / f"..spec.json.{OTHER_PID}.tmp",
            cfg.hash_state_path(DS).with_name(f".{DS}.json.{OTHER_PID}.tmp")])
    fetch_dataset(cfg, DS)
    assert sorted(os.listdir(cfg.raw_dir(DS))) == ["source.json", "training.tif", "training_groundtruth.tif"]
    meta = cfg.record_path(DS).parent
    meta.mkdir(parents=True)
    _plant([meta / f".{DS}.json.{OTHER_PID}.tmp", meta / f".{DS}.chunks.{OTHER_PID}.tmp",
            cfg.processed_path(DS).with_name(f".{DS}.h5.{OTHER_PID}.tmp")])
    normalize_dataset(cfg, DS)
    assert sorted(os.listdir(meta)) == [f"{DS}.chunks", f"{DS}.json"]
    assert not [p for p in (cfg.root / "data").rglob("*.tmp")]


@pytest.mark.parametrize("command", ["fetch", "normalize"])
def test_a_symlinked_data_folder_is_refused_before_anything_is_created(epfl_project, tmp_path, command) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (epfl_project.root / "data").symlink_to(target)
    run = fetch_dataset if command == "fetch" else normalize_dataset
    with pytest.raises(OutputError, match=r"/data: is a symbolic link; remove it"):
        run(epfl_project, DS)
    assert list(target.iterdir()) == []  # no lock file, no folder


@pytest.mark.parametrize("folder", ["processed", "metadata"])
def test_normalize_refuses_a_symlinked_output_folder_as_fetch_does(built, tmp_path, folder) -> None:
    link = built.root / "data" / folder
    target = tmp_path / folder
    link.rename(target)
    link.symlink_to(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OutputError, match=rf"data/{folder}: is a symbolic link"):
        normalize_dataset(built, DS)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert fetch_dataset(built, DS).up_to_date  # fetch does not write there


def test_a_symlinked_lock_folder_is_refused_before_it_is_used(tmp_path) -> None:
    from emdata.core.lock import LockedError, dataset_lock

    target = tmp_path / "locks"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(LockedError, match="link is a symbolic link"):
        with dataset_lock(tmp_path / "link", "x", "fetch"):
            pass
    assert list(target.iterdir()) == []


# -- item 15: the CLI's error boundary -------------------------------------------------------------------

BUG = "import emdata.stages.fetch as p\ndef bug(*a, **k):\n    raise {exc}\np.verify_dataset = bug\n"


def test_an_unexpected_exception_is_one_line_naming_the_command(built) -> None:
    proc = cli(built.root, "verify", DS, prelude=BUG.format(exc="KeyError('array_sha256')"))
    line = one_line(proc)
    assert proc.returncode == 1
    assert line == ("emdata: error: verify: unexpected KeyError: 'array_sha256'; this is a bug in emdata: run again "
                    "with EMDATA_DEBUG=1 to see the traceback, and report it")


def test_a_long_multi_line_message_stays_one_short_line(built) -> None:
    proc = cli(built.root, "verify", DS, prelude=BUG.format(exc="RuntimeError('x\\n' * 5000)"))
    line = one_line(proc)
    assert line.startswith("emdata: error: verify: unexpected RuntimeError: x x x") and len(line) < 600


@pytest.mark.parametrize("value, shown", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_emdata_debug_shows_the_traceback_only_when_set(built, value, shown) -> None:
    proc = cli(built.root, "verify", DS, prelude=BUG.format(exc="RuntimeError('boom')"), env={"EMDATA_DEBUG": value})
    assert proc.returncode != 0
    assert ("Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr) is shown, proc.stderr[-1500:]
    if not shown:
        one_line(proc)


def test_a_file_system_error_names_the_command_and_the_file(built) -> None:
    (built.root / "thumbnails").write_text("a file where summarize wants a folder")
    line = one_line(cli(built.root, "summarize"))
    assert line.startswith(f"emdata: error: summarize: {built.root / 'thumbnails'}") and "check the path" in line


def test_emdata_errors_keep_their_own_line_and_code(built) -> None:
    proc = cli(built.root, "info", "no_such_set")
    assert proc.returncode == 2 and "unknown dataset 'no_such_set'" in one_line(proc)


def test_ctrl_c_in_a_command_exits_130_with_one_line(built) -> None:
    # Ctrl-C handled as an interactive shell leaves it: a runner started in the background (nohup,
    # `cmd &` in a script) hands its children SIGINT ignored, and emdata then rightly ignores it too.
    prelude = ("import os, signal, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
               "import emdata.stages.fetch as p\n"
               "def ctrl_c(*a, **k):\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(30)\n"
               "p.verify_dataset = ctrl_c\n")
    proc = cli(built.root, "verify", DS, prelude=prelude)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["emdata: interrupted; partial downloads are kept and resume on the "
                                                "next run"]
