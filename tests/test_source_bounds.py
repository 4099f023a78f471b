"""Bounded work against answers that do not add up (issue 20, items 9 and 16).

An EMPIAR image count far above what the mirror lists, and an OMERO image list that ignores
``offset`` or ends early, are one error after a bounded number of requests (counted on the
loopback replica), never a HEAD per claimed image or a loop until memory runs out. Changing
EMPIAR's ``geometry_trust``, which only normalize reads, fetches nothing again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pytest
import yaml

from emdata.params.config import Config, load_config
from emdata.errors import FetchError, FormatError
from emdata.testing.contract import FAST_RETRIES
from emdata.testing.empiar import PIXEL_NM, RunningEmpiar, build_empiar_replica, empiar_dataset
from emdata.testing.http_server import ReplicaServer
from emdata.testing.idr import DATASET_ID, REPLICA as IDR_REPLICA, RunningIdr, idr_entry

EMPIAR_KEY = "empiar_11759"
IDR_KEY = "idr0086_u2os"


def _project(tmp_path: Path, entries: dict[str, Any]) -> Config:
    root = tmp_path / "project"
    root.mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"normalize": {"chunks": [8, 16, 16]}, "datasets": entries}))
    return load_config(root)


def _fetch(cfg: Config, key: str) -> Any:
    from emdata.transport.client import HttpClient
    from emdata.stages.fetch import fetch_dataset

    return fetch_dataset(cfg, key, http_factory=lambda: HttpClient(key, policy=FAST_RETRIES, sleep=lambda s: None))


# -- EMPIAR: the API's image count against the mirror's listing ------------------------------------


@pytest.fixture
def empiar(tmp_path: Path) -> Iterator[RunningEmpiar]:
    replica = build_empiar_replica(tmp_path / "www")  # 11 slices, _0000 to _0010
    with ReplicaServer(replica.root) as server:
        yield RunningEmpiar(replica, server)


def _heads(run: RunningEmpiar) -> int:
    return sum(1 for r in run.server.requests if r.method == "HEAD")


def test_empiar_absurd_image_count_is_refused_before_any_head(empiar: RunningEmpiar, tmp_path: Path) -> None:
    empiar.api_changes = {"num_images_or_tilt_series": 3000}  # the listing has 11: once a HEAD per missing one
    cfg = _project(tmp_path, {EMPIAR_KEY: empiar_dataset(empiar.server.url)})
    with pytest.raises(FormatError) as failed:
        _fetch(cfg, EMPIAR_KEY)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"{EMPIAR_KEY}: ")
    assert "num_images_or_tilt_series is 3000" in message and "lists 11 files matching '*.dm3'" in message
    assert _heads(empiar) == 0
    assert not cfg.raw_dir(EMPIAR_KEY).exists()


def test_empiar_sparse_series_sends_no_more_heads_than_the_count(empiar: RunningEmpiar, tmp_path: Path) -> None:
    # A twelfth listed slice numbered 2000: the series from 0 lacks 1989 numbers, the API counts 13.
    first = empiar.replica.folder / empiar.replica.names[0]
    shutil.copy(first, first.with_name(first.name.replace("_0000", "_2000")))
    empiar.api_changes = {"num_images_or_tilt_series": 13}
    cfg = _project(tmp_path, {EMPIAR_KEY: empiar_dataset(empiar.server.url)})
    with pytest.raises(FetchError, match=rf"^{EMPIAR_KEY}: .*the API lists 13 images .* the mirror has 12"):
        _fetch(cfg, EMPIAR_KEY)
    assert 1 <= _heads(empiar) <= 13


def test_changing_geometry_trust_fetches_nothing_and_renormalizes(empiar: RunningEmpiar, tmp_path: Path) -> None:
    from emdata.stages.normalize.volume import normalize_dataset

    empiar.api_changes = {"pixel_width": 100.0, "pixel_height": 100.0}  # Å: 10 nm, the DM3 says 7.998 nm
    cfg = _project(tmp_path, {EMPIAR_KEY: {**empiar_dataset(empiar.server.url), "geometry_trust": "dm3"}})
    _fetch(cfg, EMPIAR_KEY)
    with h5py.File(normalize_dataset(cfg, EMPIAR_KEY)) as f:
        np.testing.assert_allclose(f["raw"].attrs["resolution"], [50.0, PIXEL_NM, PIXEL_NM])
    raw_before = (cfg.raw_dir(EMPIAR_KEY) / "source.json").read_bytes()
    params = yaml.safe_load((cfg.root / "params.yaml").read_text())
    params["datasets"][EMPIAR_KEY]["geometry_trust"] = "api"
    (cfg.root / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(cfg.root)
    empiar.server.clear_log()
    _fetch(cfg, EMPIAR_KEY)
    assert empiar.server.requests == []  # the fetch spec did not change: nothing is fetched again
    assert (cfg.raw_dir(EMPIAR_KEY) / "source.json").read_bytes() == raw_before
    with h5py.File(normalize_dataset(cfg, EMPIAR_KEY)) as f:  # normalize reads the new trust
        np.testing.assert_allclose(f["raw"].attrs["resolution"], [50.0, 10.0, 10.0])


# -- IDR: OMERO's paged image list ----------------------------------------------------------------


@pytest.fixture
def idr(tmp_path: Path) -> Iterator[RunningIdr]:
    with IDR_REPLICA.start(tmp_path / "replica") as running:
        yield running


PAGES_PATH = f"/api/v0/m/datasets/{DATASET_ID}/images/"


@pytest.mark.parametrize("fault, problem", [("ignores_offset", "repeats images listed before"),
                                            ("ends_early", "is empty")])
def test_idr_listing_that_adds_nothing_new_stops_at_once(idr: RunningIdr, tmp_path: Path, fault: str,
                                                         problem: str) -> None:
    first = idr.replica.image_json(next(iter(idr.replica.images.values())))
    calls = [0]

    def pages(match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        calls[0] += 1
        # ignores_offset: the first image on every page and an absurd count. Ends after 50 pages
        # only so that a broken client stops too (with a short listing it then accepts).
        data = [first] if calls[0] == 1 or (fault == "ignores_offset" and calls[0] <= 50) else []
        total = 10**9 if fault == "ignores_offset" else 5
        return 200, json.dumps({"data": data, "meta": {"offset": 0, "limit": 1, "totalCount": total}}).encode(), \
            "application/json"

    idr.server.route(PAGES_PATH, pages)
    cfg = _project(tmp_path, {IDR_KEY: idr_entry(idr.server.url)})
    with pytest.raises(FormatError) as failed:
        _fetch(cfg, IDR_KEY)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"{IDR_KEY}: ") and PAGES_PATH in message
    assert f"dataset {DATASET_ID}'s image list {problem}" in message and "1 images listed of the" in message
    assert len([r for r in idr.server.requests if r.path == PAGES_PATH]) == 2
    assert not cfg.raw_dir(IDR_KEY).exists()
