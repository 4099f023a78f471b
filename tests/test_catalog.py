"""emdata.catalog(): data/metadata.csv as a pandas DataFrame, one row per dataset in params.yaml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import emdata
from emdata.errors import ConfigError, NotBuiltError
from emdata.params.config import load_config
from emdata.stages.fetch import fetch_dataset
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.summarize import summarize

REPO = Path(__file__).resolve().parents[1]


def test_catalog_of_this_repository_has_a_row_per_params_dataset(monkeypatch) -> None:
    monkeypatch.chdir(REPO / "src")  # found from a subfolder, like open_dataset
    monkeypatch.delenv("EMDATA_PROJECT", raising=False)
    table = emdata.catalog()
    assert list(table["dataset"]) == sorted(load_config(REPO).datasets)
    fib_sem = table[table["modality"] == "FIB-SEM"]
    assert "epfl_mito_train" in set(fib_sem["dataset"]) and table["license"].notna().all()


def test_catalog_after_a_build_has_the_measured_values(epfl_project) -> None:
    fetch_dataset(epfl_project, "epfl_mito_train")
    normalize_dataset(epfl_project, "epfl_mito_train")
    summarize(epfl_project)
    table = emdata.catalog(epfl_project.root).set_index("dataset")
    assert len(table) == len(epfl_project.datasets)
    assert table.loc["epfl_mito_train", "shape_zyx"] == "17x29x43" and table.loc["epfl_mito_train", "bytes_on_disk"] > 0
    assert table.loc["epfl_mito_test", "voxel_size_nm_zyx"] == "5x5x5"  # not built: what params say


def test_catalog_errors_are_one_line(tmp_path, monkeypatch) -> None:
    with pytest.raises(NotBuiltError, match="emdata summarize"):
        emdata.catalog(tmp_path)
    monkeypatch.setitem(sys.modules, "pandas", None)  # what a light install (no pipeline extra) meets
    with pytest.raises(ConfigError, match=r"pip install 'emdata\[pipeline\]'"):
        emdata.catalog(REPO)
