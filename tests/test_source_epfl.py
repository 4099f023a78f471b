"""EPFL specifics (the shared contract runs for every registered kind in test_contract.py)."""

from __future__ import annotations

import numpy as np

from emdata.config import load_config
from emdata.testing.epfl import EPFL_PATH


def test_real_params_use_the_real_epfl_urls() -> None:
    from tests.conftest import REPO

    cfg = load_config(REPO)
    image = cfg.dataset("epfl_hippocampus").source.image
    assert image.url == ("https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/"
                         "%20ElectronMicroscopy_Hippocampus/volumedata.tif")
    assert image.size == 3_353_674_357
    train = cfg.dataset("epfl_mito_train").source
    assert train.labels["mitochondria"].url.endswith("%20ElectronMicroscopy_Hippocampus/training_groundtruth.tif")


def test_plan_reports_sizes_without_downloading(epfl_project, server) -> None:
    from emdata.pipeline import plan_dataset

    plans = plan_dataset(epfl_project, "epfl_mito_train")
    assert [p.name for p in plans] == ["training.tif", "training_groundtruth.tif"]
    for p in plans:
        served = server.local_path(EPFL_PATH + p.name)
        assert p.size == served.stat().st_size and p.to_transfer == p.size and p.state == "new"
    assert {r.method for r in server.requests} == {"HEAD"}
    assert not epfl_project.raw_dir("epfl_mito_train").exists()


def test_labels_keep_native_values(epfl_project, epfl_replica) -> None:
    import h5py

    from emdata.normalize import normalize_dataset
    from emdata.pipeline import fetch_dataset

    fetch_dataset(epfl_project, "epfl_mito_test")
    with h5py.File(normalize_dataset(epfl_project, "epfl_mito_test")) as f:
        labels = f["labels/mitochondria"][()]
    assert set(np.unique(labels)) <= {0, 255}
    np.testing.assert_array_equal(labels, epfl_replica.arrays["testing_groundtruth.tif"])
