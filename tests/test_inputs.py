"""The inputs stage (emdata.stages.inputs): one small file per dataset, rewritten only when it changes."""

from __future__ import annotations

import json
import os

from emdata.stages.inputs import write_inputs
from emdata.testing.epfl import epfl_datasets
from emdata.testing.labelme_tracking import build_replica, organoid_dataset


def _read(cfg, key: str) -> dict:
    return json.loads((cfg.inputs_dir() / f"{key}.json").read_text())


def test_local_imports_are_stamped_remote_sources_give_their_kind(make_project, tmp_path) -> None:
    replica = build_replica(tmp_path / "organoids")
    remote = epfl_datasets("http://127.0.0.1:9/never/asked/")  # nothing is requested: no server needed
    cfg = make_project({"organoids": organoid_dataset(replica.folder, "Tracking"),
                        "epfl_mito_train": remote["epfl_mito_train"]})
    assert write_inputs(cfg) == {"organoids": True, "epfl_mito_train": True}
    assert _read(cfg, "epfl_mito_train") == {"kind": "epfl"}
    first = _read(cfg, "organoids")
    assert first["kind"] == "labelme_tracking" and first["stamp"]
    assert write_inputs(cfg) == {"organoids": False, "epfl_mito_train": False}  # unchanged: not rewritten

    tif = next(p for p in sorted((replica.folder / "Tracking").rglob("*")) if p.suffix.lower() in (".tif", ".tiff"))
    stat = tif.stat()
    os.utime(tif, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # copied again, say
    assert write_inputs(cfg) == {"organoids": True, "epfl_mito_train": False}
    assert _read(cfg, "organoids")["stamp"] != first["stamp"]


def test_missing_files_keep_the_last_stamp_and_a_first_run_says_why(make_project, tmp_path) -> None:
    replica = build_replica(tmp_path / "organoids")
    cfg = make_project({"organoids": organoid_dataset(replica.folder, "Tracking")})
    write_inputs(cfg)
    stamped = _read(cfg, "organoids")
    moved = tmp_path / "unmounted"
    replica.folder.rename(moved)
    assert write_inputs(cfg) == {"organoids": False}  # a clone after `dvc pull`: the last import stands
    assert _read(cfg, "organoids") == stamped

    other = make_project({"organoids": organoid_dataset(replica.folder, "Tracking")}, name="fresh")
    assert write_inputs(other) == {"organoids": True}
    assert str(replica.folder) in _read(other, "organoids")["unavailable"]


def test_removed_and_invalid_entries(make_project, tmp_path) -> None:
    remote = epfl_datasets("http://127.0.0.1:9/never/asked/")
    cfg = make_project({"a": remote["epfl_mito_train"], "b": remote["epfl_mito_test"]})
    write_inputs(cfg)
    cfg = make_project({"a": remote["epfl_mito_train"], "bad": {"source": {"kind": "no_such_kind"}}})
    write_inputs(cfg)
    assert sorted(p.stem for p in cfg.inputs_dir().glob("*.json")) == ["a", "bad"]  # b's file is gone
    assert "invalid" in _read(cfg, "bad")
