"""Croissant: every file summarize writes is valid for mlcroissant, and its record sets give the HDF5's shapes.

mlcroissant cannot decode HDF5, so the record sets hold the arrays' descriptions inline; loading
one with mlcroissant yields exactly the shapes (and dtypes) h5py reads from the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import yaml

from emdata.params.config import load_config
from emdata.stages.croissant import DATASET_DIR, REPOSITORY_FILE
from emdata.stages.fetch import fetch_dataset
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.summarize import summarize

mlc = pytest.importorskip("mlcroissant")
# rdflib (under mlcroissant) warns about its own ConjunctiveGraph
pytestmark = pytest.mark.filterwarnings("ignore:ConjunctiveGraph is deprecated:DeprecationWarning")


def _load(path: Path):
    """The file as mlcroissant reads it; a validation error raises."""
    return mlc.Dataset(jsonld=str(path))


def _records(dataset, record_set: str) -> list[dict]:
    """mlcroissant's records, keyed by field name (it keys them by field id, ``<set>/<field>``)."""
    return [{k.split("/", 1)[1]: v for k, v in r.items()} for r in dataset.records(record_set)]


def _croissant_files(root: Path) -> list[Path]:
    return [root / REPOSITORY_FILE, *sorted((root / DATASET_DIR).glob("*.json"))]


def test_volume_croissant_is_valid_and_gives_the_hdf5_shapes(epfl_project) -> None:
    cfg = epfl_project
    for key in ("epfl_mito_train", "epfl_hippocampus"):
        fetch_dataset(cfg, key)
        normalize_dataset(cfg, key)
    summarize(cfg)
    files = _croissant_files(cfg.root)
    assert [p.name for p in files] == ["croissant.json", "epfl_hippocampus.json", "epfl_mito_train.json"]
    for path in files:
        _load(path)
    doc = _load(cfg.root / DATASET_DIR / "epfl_mito_train.json")
    h5 = cfg.processed_path("epfl_mito_train")
    with h5py.File(h5) as f:
        for record_set, array in (("raw", "raw"), ("labels_mitochondria", "labels/mitochondria")):
            (row,) = _records(doc, record_set)
            assert tuple(row["shape"]) == f[array].shape and row["dtype"] == str(f[array].dtype)
            assert list(row["voxel_size_nm"]) == [5.0, 5.0, 5.0] and row["hdf5_path"] == f"/{array}"
    (row,) = _records(doc, "labels_mitochondria")
    assert [c for c in row["label_classes"]] == ["0: background", "1: mitochondria"]
    text = json.loads((cfg.root / DATASET_DIR / "epfl_mito_train.json").read_text())
    (h5_file,) = text["distribution"]
    record = json.loads(cfg.record_path("epfl_mito_train").read_text())
    assert h5_file["sha256"] == record["file_sha256"] and "md5 in dvc.lock" in text["description"]
    assert (cfg.root / DATASET_DIR / "../processed/epfl_mito_train.h5").resolve() == h5.resolve()
    catalog = _records(_load(cfg.root / REPOSITORY_FILE), "datasets")
    assert [(r["dataset"], r["built"]) for r in catalog] == [
        ("epfl_hippocampus", True), ("epfl_mito_test", False), ("epfl_mito_train", True)]


def test_collection_croissant_has_a_record_per_image_array(tmp_path) -> None:
    from emdata.testing.lightmycells import REPLICA as LMC

    with LMC.start(tmp_path / "lmc") as lmc:
        case = next(c for c in lmc.cases() if c.key == "lightmycells_study_1")
        root = tmp_path / "project"
        root.mkdir()
        params = {"normalize": {"chunks": [8, 16, 16], "image_chunks": [16, 16]}, "datasets": {case.key: case.dataset}}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        cfg = load_config(root)
        fetch_dataset(cfg, case.key)
        normalize_dataset(cfg, case.key)
    summarize(cfg)
    for path in _croissant_files(cfg.root):
        _load(path)
    doc = _load(cfg.root / DATASET_DIR / f"{case.key}.json")
    rows = _records(doc, "inputs_BF")
    with h5py.File(cfg.processed_path(case.key)) as f:
        assert {r["hdf5_path"]: tuple(r["shape"]) for r in rows} == {
            f"/{name}": f[name].shape for name in (f"images/{i}/inputs/{p}" for i in f["images"]
                                                   for p in f[f"images/{i}/inputs"])}


def test_the_committed_repository_croissant_is_valid_and_lists_every_dataset() -> None:
    root = Path(__file__).resolve().parents[1]
    rows = _records(_load(root / REPOSITORY_FILE), "datasets")
    assert [r["dataset"] for r in rows] == sorted(load_config(root).datasets)
