"""OME-Zarr on S3 (OpenOrganelle) specifics; the shared contract runs in test_contract.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import re

import numpy as np
import pytest
import yaml

from emdata.params.config import load_config
from emdata.params.schema import Section
from emdata.sources.dataset import resolve_dataset
from emdata.errors import ConfigError, FormatError
from emdata.testing import ome_zarr_s3 as replica
from emdata.testing.contract import FAST_RETRIES
from emdata.testing.registry import replica_for

pytestmark = pytest.mark.s3  # the replica serves from SeaweedFS

KEY = "openorganelle_jrc_mus_nacc_2"
S1 = "openorganelle_jrc_mus_nacc_2_s1"


@pytest.fixture
def omz(tmp_path: Path):
    with replica_for("ome_zarr_s3").start(tmp_path / "replica") as running:
        yield running


@pytest.fixture
def project(omz, make_project):
    return make_project({c.key: c.dataset for c in omz.cases()})


def _cases(omz) -> dict[str, Any]:
    return {c.key: c for c in omz.cases()}


def _edit(cfg, key: str, **source: Any):
    """Change (or with None remove) keys of a dataset's source in params.yaml; the reloaded config."""
    path = cfg.root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for k, v in source.items():
        if v is None:
            params["datasets"][key]["source"].pop(k, None)
        else:
            params["datasets"][key]["source"][k] = v
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return load_config(cfg.root)


def _cli(cfg, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=cfg.root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _fetch(cfg, key: str):
    from emdata.stages.fetch import fetch_dataset

    return fetch_dataset(cfg, key, policy=FAST_RETRIES)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- params ---------------------------------------------------------------------------------------


def test_real_params_name_the_real_bucket_group_level_roi_and_labels() -> None:
    from tests.conftest import REPO

    ds = resolve_dataset(load_config(REPO), KEY)
    src = ds.source
    assert ds.source_kind == "ome_zarr_s3" and ds.license == "CC-BY-4.0"
    assert (src.bucket, src.region, src.container, src.image) == (
        "janelia-cosem-datasets", "us-east-1", "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr", "recon-2/em/fibsem-int16")
    assert src.labels == {"nucleus": "recon-2/labels/inference/segmentations/nuc"}
    assert src.level == "s0" and src.roi.unit == "voxel"
    # Laptop-sized and chunk-aligned, as the params comment says: 256 chunks of 64^3 int16 = 128 MiB.
    shape = [int(n) for n in src.roi.shape]
    assert np.prod(shape) * 2 == 134_217_728 and all(int(a) % 64 == 0 and n % 64 == 0 for a, n in zip(src.roi.start, shape))
    assert all(int(a) + n <= full for a, n, full in zip(src.roi.start, shape, replica.REAL_SHAPES[0]))
    assert ds.voxel_size_nm is None and ds.offset_nm is None  # geometry comes from the service


@pytest.mark.parametrize("change, message", [
    ({"roi_nm": {"start": [0, 0, 0], "shape": [10, 10, 10]}}, "either in voxels"),
    ({"bucket": "Janelia_COSEM"}, "not an S3 bucket name"),
    ({"image": "/recon-2/em"}, "plain relative path"),
    ({"level": "s0/../s1"}, "not a level path"),
    ({"roi": {"start": [0, 0, -1], "shape": [1, 1, 1]}}, "non-negative integers"),
    ({"roi": {"start": [0, 0, 0], "shape": [1, 0, 1]}}, "positive integers"),
    ({"roi": {"start": [0, 0, 0], "shape": [1, 1, 1], "unit": "nm"}}, "unknown key"),
])
def test_bad_params_name_their_key(change: dict[str, Any], message: str) -> None:
    from emdata.sources import ome_zarr_s3 as source

    base = {"kind": "ome_zarr_s3", "region": "us-east-1", "bucket": "janelia-cosem-datasets",
            "container": "c.zarr", "image": "em", "level": "s0", "roi": {"start": [0, 0, 0], "shape": [1, 1, 1]}}
    with pytest.raises(ConfigError, match=message):
        source.parse_params(Section({**base, **change}, "datasets.x.source"))


# -- metadata -------------------------------------------------------------------------------------


def test_the_real_multiscales_parse_with_float_scales_and_the_translation_rule() -> None:
    from emdata.formats.ngff import GRID_TOLERANCE, parse_multiscales

    ms = parse_multiscales(replica.multiscales(""), "g", "where", "ds")
    assert list(ms.levels) == [f"s{i}" for i in range(9)] and ms.version == "0.4"
    s2 = ms.levels["s2"]
    assert s2.scale == (11.840000000000002, 16.0, 16.0) and s2.in_nm
    for level in ms.levels.values():  # translation = (scale_n - scale_0) / 2, up to float noise
        expected = [(s - s0) / 2 for s, s0 in zip(level.scale, ms.levels["s0"].scale)]
        np.testing.assert_allclose(level.translation, expected, rtol=0, atol=GRID_TOLERANCE * level.scale[0])


def test_units_and_the_multiscale_transformation_are_applied() -> None:
    from emdata.formats.ngff import parse_multiscales

    attrs = replica.multiscales("")
    ms0 = attrs["multiscales"][0]
    ms0["axes"] = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"}
                                                          for a in "zyx"]
    for d in ms0["datasets"]:
        for t in d["coordinateTransformations"]:
            t[t["type"]] = [1.0] + [v / 1000 for v in t[t["type"]]]
    ms0["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 2.0, 1.0, 1.0]},
                                        {"type": "translation", "translation": [0.0, 0.5, 0.0, 0.0]}]
    ms = parse_multiscales(attrs, "g", "where", "ds")
    assert ms.lead == 1
    np.testing.assert_allclose(ms.levels["s1"].scale, (11.84, 8.0, 8.0))
    np.testing.assert_allclose(ms.levels["s1"].translation, (2.96 + 500.0, 2.0, 2.0))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(axes=[{"name": a, "type": "space"} for a in "xyz"]), "z, y, x"),
    (lambda m: m["axes"][0].update(unit="parsec"), "not a length unit"),
    (lambda m: m["datasets"][0].update(coordinateTransformations=[{"type": "translation", "translation": [0] * 3}]),
     "scale and an optional translation"),
    (lambda m: m.pop("datasets"), "no datasets"),
])
def test_unusable_multiscales_are_format_errors(edit, message: str) -> None:
    from emdata.formats.ngff import parse_multiscales

    attrs = replica.multiscales("")
    edit(attrs["multiscales"][0])
    with pytest.raises(FormatError, match=message):
        parse_multiscales(attrs, "g", "where", "ds")


def test_zarray_is_read_as_served_and_checked() -> None:
    from emdata.formats.ngff import parse_zarray

    meta = {"zarr_format": 2, "shape": [564, 2520, 2596], "chunks": [64, 64, 64], "dtype": "<i2",
            "compressor": {"id": "zstd", "level": 1}, "fill_value": 0, "order": "C", "filters": None,
            "dimension_separator": "/"}
    info = parse_zarray(meta, "g/s0", 0, "w", "ds")
    box = ((192, 1024, 1024), (448, 1536, 1536))
    keys = info.chunk_keys(box)
    assert len(keys) == 256 and keys[0] == "g/s0/3/16/16" and keys[-1] == "g/s0/6/23/23"
    assert [info.row_prefix(r) for r in info.chunk_rows(box)] == [f"g/s0/{k}/" for k in (3, 4, 5, 6)]
    dotted = parse_zarray({**meta, "dimension_separator": None}, "g/s0", 0, "w", "ds")
    assert dotted.chunk_keys(((0, 0, 0), (1, 1, 65)))[1] == "g/s0/0.0.1"  # zarr v2's default is '.'
    for bad, message in [({"filters": [{"id": "delta"}]}, "filters"), ({"compressor": {"id": "lzma"}}, "compressor"),
                         ({"dimension_separator": "_"}, "dimension_separator"), ({"dtype": "|O"}, "number type"),
                         ({"chunks": [64, 64]}, "matching dimensions")]:
        with pytest.raises(FormatError, match=message):
            parse_zarray({**meta, **bad}, "g/s0", 0, "w", "ds")


# -- plan and fetch against the replica -----------------------------------------------------------


def test_plan_reports_chunks_and_bytes_that_fetch_then_transfers(omz, project) -> None:
    from emdata.stages.fetch import plan_dataset

    rows = plan_dataset(project, KEY, policy=FAST_RETRIES)
    chunk_rows = [r for r in rows if "chunks" in r.name]
    assert [r.name.split(":")[0] for r in chunk_rows] == ["raw s0", "labels/nucleus s0"]
    planned = {r.name.split(" ")[0]: (r.files, r.size) for r in chunk_rows}
    gets = [r for r in omz.server.requests if r.method == "GET" and "list-type" not in r.query]
    assert all(r.path.rsplit("/", 1)[-1].startswith(".z") for r in gets), "plan fetched data"
    assert not project.raw_dir(KEY).exists() and not project.partial_dir(KEY).exists()
    expected_keys = omz.chunk_keys("s0", replica.CASES[KEY][1])
    assert "recon-2/em/fibsem-int16/s0/1/2/3" not in expected_keys["raw"]  # the missing chunk: fill value
    assert "(+1 absent: fill)" in chunk_rows[0].name
    omz.server.clear_log()
    _fetch(project, KEY)
    for name, keys in expected_keys.items():
        paths = {omz.key_path(k) for k in keys}
        served = [r for r in omz.server.requests if r.path in paths and r.method == "GET"]
        assert len(served) == len(keys) == planned[name][0]
        assert sum(r.sent for r in served) == planned[name][1] == sum(len(omz.server.object_bytes(p)) for p in paths)
    # Byte for byte, where a zarr reader expects them, with the group and array metadata.
    local = project.raw_dir(KEY) / "jrc_mus-nacc-2.zarr"
    for key in expected_keys["raw"] + ["recon-2/em/fibsem-int16/.zattrs", "recon-2/em/fibsem-int16/s0/.zarray",
                                       ".zgroup", "recon-2/labels/inference/segmentations/nuc/s0/.zarray"]:
        assert (local / key).read_bytes() == omz.server.object_bytes(omz.key_path(key)), key
    record = json.loads((project.raw_dir(KEY) / "source.json").read_text())
    assert record["extra"]["arrays"]["raw"]["absent_chunks"] == ["recon-2/em/fibsem-int16/s0/1/2/3"]
    assert [record["extra"]["arrays"][n]["bytes"] for n in ("raw", "labels/nucleus")] == [
        planned["raw"][1], planned["labels/nucleus"][1]]
    assert record["extra"]["roi_voxels"] == {"start": [3, 17, 21], "stop": [24, 47, 71]}


def test_local_copy_is_a_zarr_hierarchy_tensorstore_reads(omz, project) -> None:
    import tensorstore as ts

    _fetch(project, S1)
    root = project.raw_dir(S1) / "jrc_mus-nacc-2.zarr"
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(root / "recon-2/em/fibsem-int16/s1")}},
                    read=True).result()
    np.testing.assert_array_equal(array.read().result(), omz.data["images"]["s1"])
    assert json.loads((root / ".zgroup").read_text()) == {"zarr_format": 2}


def test_roi_in_nm_selects_the_same_voxels_as_in_voxels(omz, project) -> None:
    import h5py

    from emdata.stages.normalize.volume import normalize_dataset

    case = _cases(omz)[KEY]
    scale, trans = replica.REAL_SCALES[0], replica.REAL_TRANSLATIONS[0]
    start, shape = [3, 17, 21], [21, 30, 50]
    nm = {"start": [t + a * s for t, a, s in zip(trans, start, scale)], "shape": [n * s for n, s in zip(shape, scale)]}
    cfg = _edit(project, KEY, roi=None, roi_nm=nm)
    _fetch(cfg, KEY)
    with h5py.File(normalize_dataset(cfg, KEY)) as f:
        np.testing.assert_array_equal(f["raw"][()], case.expected["raw"])
        np.testing.assert_array_equal(f["labels/nucleus"][()], case.expected["labels/nucleus"])
        np.testing.assert_allclose(f["raw"].attrs["offset"], case.offset_nm)
        np.testing.assert_allclose(f["labels/nucleus"].attrs["resolution"], scale)


def test_int16_stays_signed_and_the_thumbnail_is_windowed(omz, make_project) -> None:
    import io

    import h5py
    from PIL import Image

    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.summarize import summarize

    cfg = make_project({KEY: _cases(omz)[KEY].dataset})
    _fetch(cfg, KEY)
    with h5py.File(normalize_dataset(cfg, KEY)) as f:
        raw = f["raw"]
        assert raw.dtype == np.dtype("<i2") and raw[()].min() < 0 < raw[()].max()
    summarize(cfg)
    png = np.asarray(Image.open(io.BytesIO((cfg.root / "thumbnails" / f"{KEY}_xy.png").read_bytes())))
    assert png.std() > 40 and np.mean((png == 0) | (png == 255)) < 0.2  # not black, not saturated
    summary = (cfg.root / "METADATA_SUMMARY.md").read_text()
    assert f"thumbnails/{KEY}_xy.png" in summary and "fibsem-int16/s0" in summary


# -- errors: one line, non-zero exit, existing outputs untouched ----------------------------------


def _built(project) -> dict[str, bytes]:
    from emdata.stages.normalize.volume import normalize_dataset

    _fetch(project, KEY)
    normalize_dataset(project, KEY)
    return {**_tree(project.raw_dir(KEY)), **_tree(project.root / "data" / "processed")}


def _assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emdata: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("change, words", [
    ({"roi": {"start": [30, 0, 0], "shape": [10, 5, 5]}}, ["roi", "not inside the level", "[37, 61, 83]"]),
    ({"level": "s9"}, ["source.level", "'s9'", "s0, s1"]),
    ({"image": "recon-2/em/fibsem-uint8"}, ["s3://janelia-cosem-datasets/", "fibsem-uint8/.zattrs", "no such object"]),
])
def test_bad_region_level_or_group_is_one_line_and_outputs_stay(omz, project, change, words) -> None:
    from emdata.errors import EmdataError
    from emdata.stages.fetch import plan_dataset

    before = _built(project)
    cfg = _edit(project, KEY, **change)
    _assert_one_line_error(_cli(cfg, "fetch", KEY), KEY, *words)
    with pytest.raises(EmdataError) as err:  # plan says the same, before anything is fetched
        plan_dataset(cfg, KEY, policy=FAST_RETRIES)
    assert all(word in str(err.value) for word in words)
    assert {**_tree(cfg.raw_dir(KEY)), **_tree(cfg.root / "data" / "processed")} == before


def test_labels_on_another_grid_are_refused_before_any_chunk_is_fetched(omz, project) -> None:
    before = _built(project)
    attrs = replica.multiscales("nuc")
    attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][1]["translation"] = [0.0, 2.0, 2.0]
    omz.server.replace(omz.key_path(f"{replica.NUCLEUS}/.zattrs"), json.dumps(attrs).encode())
    cfg = _edit(project, KEY, roi={"start": [3, 17, 21], "shape": [22, 30, 50]})  # new params: a new fetch
    omz.server.clear_log()
    line = _assert_one_line_error(_cli(cfg, "fetch", KEY), KEY, "another grid", "nucleus", "translation")
    assert "[0.0, 2.0, 2.0]" in line
    assert not [r for r in omz.server.requests if "list-type" in r.query or "/s0/" in r.path and ".z" not in r.path]
    assert {**_tree(cfg.raw_dir(KEY)), **_tree(cfg.root / "data" / "processed")} == before
    # Float noise is no other grid: 2.96 * 2**k as the service writes it equals the rounded value.
    attrs = replica.multiscales("nuc")
    attrs["multiscales"][0]["datasets"][2]["coordinateTransformations"][0]["scale"] = [11.84, 16.0, 16.0]
    omz.server.replace(omz.key_path(f"{replica.NUCLEUS}/.zattrs"), json.dumps(attrs).encode())
    cfg = _edit(cfg, KEY, level="s2", roi=None)
    assert _fetch(cfg, KEY).up_to_date is False


def test_wrong_credentials_in_the_environment_are_not_used(omz, project, tmp_path: Path) -> None:
    creds = tmp_path / "aws-credentials"
    creds.write_text("[default]\naws_access_key_id = AKIAEMDATAWRONGKEY01\naws_secret_access_key = wrong\n")
    env = {"AWS_ACCESS_KEY_ID": "AKIAEMDATAWRONGKEY00", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_SESSION_TOKEN": "x",
           "AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_EC2_METADATA_DISABLED": "false",
           "AWS_EC2_METADATA_SERVICE_ENDPOINT": omz.server.url + "/"}
    proc = _cli(project, "fetch", KEY, env=env)
    assert proc.returncode == 0, proc.stderr
    assert omz.server.requests and all("Authorization" not in r.headers for r in omz.server.requests)
    assert not [r for r in omz.server.requests if r.path.startswith("/latest/") or r.status == 403]
    # A client that signs with them is refused, as AWS refuses unknown keys even for public data.
    import requests

    signed = requests.get(omz.server.url + omz.key_path(".zgroup"), headers={"Authorization": "AWS4-HMAC-SHA256 x"})
    assert signed.status_code == 403 and b"InvalidAccessKeyId" in signed.content


def test_a_listed_chunk_that_is_gone_stops_the_fetch_and_keeps_finished_ones(omz, project) -> None:
    from emdata.errors import FetchError

    case = _cases(omz)[KEY]
    omz.server.hide(case.fault_path)
    with pytest.raises(FetchError, match="although its listing named it"):
        _fetch(project, KEY)
    partial = project.partial_dir(KEY) / "jrc_mus-nacc-2.zarr"
    kept = [p for p in partial.rglob("*") if p.is_file() and not p.name.startswith(".z")]
    assert kept and not [p for p in kept if p.name.endswith(".part")]


# -- the pipeline -----------------------------------------------------------------------------------


@pytest.mark.dvc
def test_dvc_repro_of_an_roi_at_s0_and_a_whole_coarser_level(omz, tmp_path: Path) -> None:
    """``dvc repro`` in a copy of this repository whose params hold the replica's two cases."""
    import io

    import h5py
    from PIL import Image

    from emdata.testing.demo import copy_repository
    from emdata.testing.dvc import dvc, git, offline_env
    from tests.conftest import REPO

    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    copy_repository(REPO, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    cases = _cases(omz)
    params["datasets"] = {k: c.dataset for k, c in cases.items()}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(["init", "-q", "-b", "main"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "replica params"], repo, env)
    out = dvc(["repro"], repo, env)
    assert sorted(set(re.findall(r"Running stage '([^']+)'", out))) == sorted(
        [f"{stage}@{k}" for k in cases for stage in ("fetch", "normalize")] + ["inputs", "summarize"])
    assert re.findall(r"Running stage '([^']+)'", dvc(["repro"], repo, env)) == ["inputs"]  # it always runs
    for key, case in cases.items():
        with h5py.File(repo / "data" / "processed" / f"{key}.h5") as f:
            raw, nucleus = f["raw"][()], f["labels/nucleus"][()]
            np.testing.assert_array_equal(raw, case.expected["raw"])
            np.testing.assert_array_equal(nucleus, case.expected["labels/nucleus"])
            for name in ("raw", "labels/nucleus"):
                np.testing.assert_allclose(f[name].attrs["resolution"], case.voxel_size_nm)
                np.testing.assert_allclose(f[name].attrs["offset"], case.offset_nm)
        # Labels align voxel for voxel: both are the same box of the same level of the replica.
        level = case.dataset["source"]["level"]
        start, stop = omz.box(level, case.dataset["source"]["roi"])
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        np.testing.assert_array_equal(nucleus, omz.data["labels"][level][box])
        np.testing.assert_array_equal(raw, omz.data["images"][level][box])
        png = np.asarray(Image.open(io.BytesIO((repo / "thumbnails" / f"{key}_xy.png").read_bytes())))
        assert png.std() > 40
    summary = (repo / "METADATA_SUMMARY.md").read_text()
    assert all(f"thumbnails/{key}_xy.png" in summary for key in cases)


def test_a_damaged_chunk_left_by_an_interrupted_fetch_is_fetched_again(omz, project) -> None:
    from emdata.errors import FetchError

    case = _cases(omz)[KEY]
    omz.server.fail(case.fault_path, status=500, times=1000)
    with pytest.raises(FetchError):
        _fetch(project, KEY)
    partial = project.partial_dir(KEY)
    kept = sorted(rel for rel in case.files if (partial / rel).is_file())
    assert kept
    damaged = partial / kept[0]
    damaged.write_bytes(bytes(b ^ 0xFF for b in damaged.read_bytes()))  # same size, other bytes
    omz.server.clear_faults()
    omz.server.clear_log()
    _fetch(project, KEY)
    refetched = {r.path for r in omz.server.requests if r.method == "GET"}
    assert case.files[kept[0]] in refetched and case.fault_path in refetched
    assert not {case.files[rel] for rel in kept[1:]} & refetched
    assert (project.raw_dir(KEY) / kept[0]).read_bytes() == omz.server.object_bytes(case.files[kept[0]])


def _verify_raw(cfg, key: str):
    from emdata.stages.fetch import verify_raw

    return verify_raw(resolve_dataset(cfg, key))


def test_verify_names_the_array_whose_chunk_changed_on_disk(omz, project) -> None:
    from emdata.errors import IntegrityError

    _fetch(project, KEY)
    raw = project.raw_dir(KEY)
    arrays = json.loads((raw / "source.json").read_text())["extra"]["arrays"]
    passed = dict(_verify_raw(project, KEY))
    assert all(f"raw {a['array']} group sha256" in passed for a in arrays.values())
    label = arrays["labels/nucleus"]["array"]
    chunk = next(rel for rel in sorted(_cases(omz)[KEY].files) if "/nuc/s0/" in rel and "/." not in rel)
    data = bytearray((raw / chunk).read_bytes())
    data[-1] ^= 1  # same size: only a digest can tell
    (raw / chunk).write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        _verify_raw(project, KEY)
    message = str(err.value)
    assert f"{label}: " in message and chunk in message and "\n" not in message


def test_verify_fails_when_the_records_array_digest_was_edited(omz, project) -> None:
    from emdata.errors import IntegrityError

    _fetch(project, KEY)
    path = project.raw_dir(KEY) / "source.json"
    record = json.loads(path.read_text())
    raw_array = record["extra"]["arrays"]["raw"]["array"]
    record["extra"]["array_digests"][raw_array] = "0" * 64
    path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError) as err:
        _verify_raw(project, KEY)
    message = str(err.value)
    assert f"{raw_array}: " in message and "0" * 64 in message and "\n" not in message


# -- label arrays chosen by name ------------------------------------------------------------------


def test_plan_lists_the_label_arrays_and_another_one_is_fetched_by_name(omz, project) -> None:
    import h5py

    from emdata.stages.normalize.volume import normalize_dataset

    proc = _cli(project, "plan", KEY)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("label arrays under"))
    assert "recon-2/labels/: 2" in lines[at]
    assert lines[at + 1].split() == ["-", replica.MITO] and lines[at + 2].split() == ["nucleus", replica.NUCLEUS]
    cfg = _edit(project, KEY, labels={"mitochondria": replica.MITO})
    _fetch(cfg, KEY)
    (start, stop) = omz.box("s0", replica.CASES[KEY][1])
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    with h5py.File(normalize_dataset(cfg, KEY)) as f:
        assert sorted(f["labels"]) == ["mitochondria"] and f["labels/mitochondria"].dtype == np.uint64
        np.testing.assert_array_equal(f["labels/mitochondria"][()], omz.data["mito"]["s0"][crop])
        np.testing.assert_array_equal(f["raw"][()], _cases(omz)[KEY].expected["raw"])


def test_a_label_array_the_source_does_not_have_is_one_line_naming_those_it_has(omz, project) -> None:
    from emdata.errors import ConfigError
    from emdata.stages.fetch import plan_dataset

    wrong = "recon-2/labels/inference/segmentations/er"
    cfg = _edit(project, KEY, labels={"nucleus": replica.NUCLEUS, "er": wrong})
    line = _assert_one_line_error(_cli(cfg, "fetch", KEY), f"datasets.{KEY}.source.labels.er", repr(wrong),
                                  f"{replica.MITO}, {replica.NUCLEUS}")
    assert "is not a label array" in line
    with pytest.raises(ConfigError, match="it has: "):
        plan_dataset(cfg, KEY, policy=FAST_RETRIES)
    assert not cfg.raw_dir(KEY).exists()
