"""EPFL specifics (the shared contract runs for every registered kind in test_contract.py)."""

from __future__ import annotations

import numpy as np

from emdata.params.config import load_config
from emdata.sources.dataset import resolve_dataset
from emdata.testing.epfl import EPFL_PATH


def test_real_params_use_the_real_epfl_urls() -> None:
    from tests.conftest import REPO

    cfg = load_config(REPO)
    image = resolve_dataset(cfg, "epfl_hippocampus").source.image
    assert image.url == ("https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/"
                         "%20ElectronMicroscopy_Hippocampus/volumedata.tif")
    assert image.size == 3_353_674_357
    train = resolve_dataset(cfg, "epfl_mito_train").source
    assert train.labels["mitochondria"].url.endswith("%20ElectronMicroscopy_Hippocampus/training_groundtruth.tif")


def test_plan_reports_sizes_without_downloading(epfl_project, server) -> None:
    from emdata.stages.fetch import plan_dataset

    plans = plan_dataset(epfl_project, "epfl_mito_train")
    assert [p.name for p in plans] == ["training.tif", "training_groundtruth.tif"]
    for p in plans:
        served = server.local_path(EPFL_PATH + p.name)
        assert p.size == served.stat().st_size and p.to_transfer == p.size and p.state == "new"
    assert {r.method for r in server.requests} == {"HEAD"}
    assert not epfl_project.raw_dir("epfl_mito_train").exists()


def test_labels_are_mapped_by_params_and_native_values_stay_available(epfl_project, epfl_replica) -> None:
    import json

    import h5py
    import yaml

    from emdata.params.config import load_config
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    native = epfl_replica.arrays["testing_groundtruth.tif"]
    fetch_dataset(epfl_project, "epfl_mito_test")
    with h5py.File(normalize_dataset(epfl_project, "epfl_mito_test")) as f:
        labels = f["labels/mitochondria"]
        assert set(np.unique(labels[()])) == {0, 1}
        np.testing.assert_array_equal(labels[()], (native == 255).astype(np.uint8))
        assert json.loads(labels.attrs["value_map"]) == {"255": 1}
    params_path = epfl_project.root / "params.yaml"  # without label_values: the native 0/255
    params = yaml.safe_load(params_path.read_text())
    del params["datasets"]["epfl_mito_test"]["label_values"]
    params_path.write_text(yaml.safe_dump(params))
    with h5py.File(normalize_dataset(load_config(epfl_project.root), "epfl_mito_test")) as f:
        np.testing.assert_array_equal(f["labels/mitochondria"][()], native)
        assert "value_map" not in f["labels/mitochondria"].attrs


def test_real_params_store_the_epfl_masks_as_zero_and_one() -> None:
    from tests.conftest import REPO

    cfg = load_config(REPO)
    for key in ("epfl_mito_train", "epfl_mito_test"):
        assert resolve_dataset(cfg, key).label_values == {"mitochondria": {255: 1}}
