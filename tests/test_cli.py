"""The command line: one-line errors with non-zero exits, outputs left untouched."""

from __future__ import annotations

import hashlib
import json

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emdata.core.digest import sha256_file


def emdata(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("emdata: error: ")
    return lines[0]


@pytest.fixture
def built(epfl_project):
    """A project with epfl_mito_train fetched and normalized (in this process: the tests run the CLI)."""
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    fetch_dataset(epfl_project, "epfl_mito_train")
    normalize_dataset(epfl_project, "epfl_mito_train")
    return epfl_project


def _outputs(cfg) -> dict[str, str]:
    files = [cfg.processed_path("epfl_mito_train"), cfg.record_path("epfl_mito_train")]
    return {str(p): sha256_file(p) for p in files}


def test_help_is_fast_and_lists_the_commands(tmp_path) -> None:
    proc = emdata(tmp_path, "--help")
    assert proc.returncode == 0
    for command in ("list", "plan", "fetch", "normalize", "summarize", "info", "verify", "demo"):
        assert command in proc.stdout
    code = "import sys, emdata.cli; print(sorted(m for m in ('h5py', 'tifffile', 'dvc', 'requests') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_dataset(built) -> None:
    before = _outputs(built)
    line = one_line_error(emdata(built.root, "normalize", "no_such_set"))
    assert "unknown dataset 'no_such_set'" in line and "epfl_mito_train" in line
    assert _outputs(built) == before


def test_unknown_source_kind_and_bad_key(built) -> None:
    before = _outputs(built)
    params_path = built.root / "params.yaml"
    good = params_path.read_text()
    params = yaml.safe_load(good)
    params["datasets"]["epfl_mito_test"]["source"]["kind"] = "gopher"
    params_path.write_text(yaml.safe_dump(params))
    line = one_line_error(emdata(built.root, "normalize", "epfl_mito_test"))
    assert "datasets.epfl_mito_test.source.kind: unknown source kind 'gopher'" in line
    params = yaml.safe_load(good)
    params["datasets"]["epfl_mito_train"]["voxel_sise_nm"] = [1, 1, 1]
    params_path.write_text(yaml.safe_dump(params))
    line = one_line_error(emdata(built.root, "normalize", "epfl_mito_train"))
    assert "datasets.epfl_mito_train.voxel_sise_nm: unknown key" in line
    assert _outputs(built) == before


def test_corrupt_tiff(built) -> None:
    before = _outputs(built)
    tif = built.raw_dir("epfl_mito_train") / "training.tif"
    data = bytearray(tif.read_bytes())
    data[4:8] = b"\xff\xff\xff\x7f"  # the first page directory now points past the end of the file
    tif.write_bytes(bytes(data))
    line = one_line_error(emdata(built.root, "normalize", "epfl_mito_train"))  # changed after the fetch
    assert "epfl_mito_train" in line and "training.tif does not match its recorded sha256" in line
    assert _outputs(built) == before
    # As if the server had sent these bytes: the record vouches for them, the reader refuses them.
    record_path = built.raw_dir("epfl_mito_train") / "source.json"
    record = json.loads(record_path.read_text())
    record["files"]["training.tif"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    record_path.write_text(json.dumps(record))
    before = _outputs(built)
    line = one_line_error(emdata(built.root, "normalize", "epfl_mito_train"))
    assert "epfl_mito_train" in line and "training.tif" in line and "not a readable TIFF" in line
    assert _outputs(built) == before
    leftovers = [p.name for p in built.processed_path("epfl_mito_train").parent.iterdir()]
    assert leftovers == ["epfl_mito_train.h5"]


def test_missing_params_file(tmp_path) -> None:
    line = one_line_error(emdata(tmp_path, "list"))
    assert "no params.yaml" in line


def test_list_info_verify(built) -> None:
    listing = emdata(built.root, "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith("epfl_mito_train"))
    assert row.split()[2] == "yes" and "yes" in row.split()[4:]
    info = emdata(built.root, "info", "epfl_mito_train")
    assert info.returncode == 0 and "[17, 29, 43] uint8" in info.stdout
    verify = emdata(built.root, "verify", "epfl_mito_train")
    assert verify.returncode == 0 and verify.stdout.count("ok  ") == 5  # 2 raw files, file, 2 arrays
    tif = built.raw_dir("epfl_mito_train") / "training.tif"
    data = bytearray(tif.read_bytes())
    data[-1] ^= 1  # one flipped byte, same size: only the recorded sha256 can tell
    tif.write_bytes(bytes(data))
    line = one_line_error(emdata(built.root, "verify", "epfl_mito_train"))
    assert "training.tif does not match its recorded sha256" in line


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMDATA_DEBUG", "1")
    proc = emdata(tmp_path, "list")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_typo_in_one_dataset_blocks_only_that_one(built) -> None:
    """fetch A works while B has a typo; `check` and `list` report B's key path and fail."""
    params_path = built.root / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["datasets"]["epfl_mito_test"]["titel"] = "typo"
    params_path.write_text(yaml.safe_dump(params))
    fetch = emdata(built.root, "fetch", "epfl_hippocampus")
    assert fetch.returncode == 0, fetch.stderr
    check = emdata(built.root, "check")
    assert check.returncode == 2
    assert "datasets.epfl_mito_test.titel: unknown key" in check.stdout
    assert "ok      epfl_hippocampus" in check.stdout
    listing = emdata(built.root, "list")
    assert listing.returncode == 2 and "invalid: params.yaml: datasets.epfl_mito_test.titel" in listing.stdout


@pytest.mark.parametrize("args, words", [(["fetch"], "Missing argument 'dataset'"),
                                         (["nosuchcmd"], "No such command 'nosuchcmd'"),
                                         (["list", "--bogus"], "No such option")])
def test_usage_mistakes_are_one_line(tmp_path, args, words) -> None:
    proc = emdata(tmp_path, *args)
    line = one_line_error(proc)
    assert words in line and proc.returncode == 2


@pytest.mark.parametrize("command", ["info", "verify", "summarize"])
def test_a_truncated_metadata_record_is_one_line(built, command) -> None:
    record = built.record_path("epfl_mito_train")
    record.write_text(record.read_text()[:40])
    args = [command] if command == "summarize" else [command, "epfl_mito_train"]
    line = one_line_error(emdata(built.root, *args))
    assert "metadata record is damaged" in line and "emdata normalize epfl_mito_train" in line


@pytest.mark.parametrize("command", ["plan", "fetch"])
def test_an_unresolvable_host_is_one_short_line(make_project, command) -> None:
    """(That it is not retried is counted in test_http_hardening's unresolvable-host test.)"""
    base = "https://no-such-host.invalid/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/"
    entry = {"title": "t", "license": "l", "citation": "c", "modality": "FIB-SEM", "voxel_size_nm": [5, 5, 5],
             "offset_nm": [0, 0, 0], "source": {"kind": "epfl", "base_url": base, "image": {"file": "volumedata.tif"}}}
    cfg = make_project({"offline_set": entry})
    line = one_line_error(emdata(cfg.root, command, "offline_set"))
    assert len(line) <= 200 and "offline_set" in line and "cannot resolve host no-such-host.invalid" in line
