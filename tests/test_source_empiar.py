"""EMPIAR specifics (the shared contract runs for every registered kind in test_contract.py).

The replica's DM3 files are checked against two independent readers (RosettaSciIO, which the
source uses, and ncempy, a test dependency only) and against the real slice's tag structure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pytest
import yaml

from emdata.errors import ConfigError, FormatError
from emdata.params.config import load_config
from emdata.sources.dataset import resolve_dataset
from emdata.core.digest import sha256_file
from emdata.testing.empiar import (
    ACCESSION,
    DATA_PATH,
    PIXEL_NM,
    XML_NAME,
    RunningEmpiar,
    build_empiar_replica,
    empiar_dataset,
    write_slice,
)
from emdata.testing.http_server import ReplicaServer
from tests.conftest import REPO

KEY = "empiar_11759"
# The real slice 0000's tags (shared/reference/empiar_11759_slice_0000_dm3_tags.json, a pyDM3reader
# dump) that the replica must reproduce; checked against that file where it is present.
REFERENCE = REPO.parent / "shared" / "reference" / "empiar_11759_slice_0000_dm3_tags.json"
REAL_TAGS = {
    "root.ImageList.0.ImageData.DataType": "23", "root.ImageList.0.ImageData.PixelDepth": "4",
    "root.ImageList.1.ImageData.DataType": "6", "root.ImageList.1.ImageData.PixelDepth": "1",
    "root.ImageList.1.ImageData.Calibrations.Dimension.0.Units": "µm",
    "root.ImageList.1.ImageData.Calibrations.Dimension.1.Units": "µm",
    "root.ImageList.1.ImageData.Calibrations.Dimension.0.Scale": "0.007998250424861908",
    "root.ImageList.1.ImageTags.SBFSEM.Record.Slice thickness": "50.0",
    "root.ImageList.1.ImageTags.SBFSEM.Approach.Slice thickness": "200.0",
    "root.ImageList.1.ImageTags.Meta Data.Dimension info.2.Scale": "50.0",
    "root.ImageList.1.ImageTags.Meta Data.Dimension info.2.Units": "nm",
    "root.ImageList.1.ImageTags.Microscope Info.Name": "FEI Quanta",
    "root.ImageList.1.ImageTags.Session Info.Detector": "3VBSED",
    "root.ImageList.1.ImageTags.DataBar.Acquisition Date": "11.06.2018",
    "root.ImageList.1.ImageTags.DataBar.Acquisition Time": "22:27:16",
    "root.Thumbnails.0.ImageIndex": "0",
}


@contextmanager
def running(root: Path, **build: Any) -> Iterator[RunningEmpiar]:
    replica = build_empiar_replica(root, **build)
    with ReplicaServer(replica.root) as server:
        yield RunningEmpiar(replica, server)


@pytest.fixture
def empiar(tmp_path: Path) -> Iterator[RunningEmpiar]:
    with running(tmp_path / "www") as run:
        yield run


def project(make_project, run: RunningEmpiar, **source: Any):
    return make_project({KEY: empiar_dataset(run.server.url, **source)})


def build(cfg) -> Path:
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    fetch_dataset(cfg, KEY)
    return normalize_dataset(cfg, KEY)


def test_real_params_use_the_real_empiar_endpoints() -> None:
    ds = resolve_dataset(load_config(REPO), KEY)
    src = ds.source
    assert src.api_url == "https://www.ebi.ac.uk/empiar/api/entry/EMPIAR-11759/"
    assert src.base_url == "https://ftp.ebi.ac.uk/empiar/world_availability/11759/data/"
    assert (src.accession, ds.accession, ds.doi) == (ACCESSION, ACCESSION, "10.6019/EMPIAR-11759")
    assert "CC0" in ds.license and ds.voxel_size_nm is None  # geometry comes from the DM3 files
    assert src.include_folders == () and src.pattern == "*.dm3"


def test_replica_dm3_files_read_the_same_with_rosettasciio_and_ncempy(empiar: RunningEmpiar) -> None:
    from ncempy.io import dm as ncempy_dm
    from rsciio.digitalmicrograph import file_reader

    volume = empiar.replica.volume
    thumbs = set()
    for z, name in enumerate(empiar.replica.names):
        path = empiar.replica.folder / name
        (signal,) = file_reader(str(path))  # the thumbnail is skipped (Thumbnails.0.ImageIndex = 0)
        other = ncempy_dm.dmReader(str(path))
        np.testing.assert_array_equal(signal["data"], volume[z])
        np.testing.assert_array_equal(other["data"], volume[z])
        assert signal["data"].dtype == other["data"].dtype == np.uint8
        assert [a["units"] for a in signal["axes"]] == list(other["pixelUnit"]) == ["µm", "µm"]
        np.testing.assert_allclose([a["scale"] for a in signal["axes"]], other["pixelSize"], rtol=1e-7)
        np.testing.assert_allclose(other["pixelSize"], [PIXEL_NM / 1000] * 2, rtol=1e-7)
        with ncempy_dm.fileDM(str(path)) as f:
            assert f.thumbnail and f.numObjects == 2 and f.dataType == [23, 6]  # RGBA thumbnail, then uint8
            thumbs.add(f.getThumbnail().shape)
    assert len(thumbs) > 1  # the thumbnail's size varies per file, as in the real entry


def _flat(tree: Any, prefix: str = "root") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def _same(ours: Any, real: str) -> bool:
    try:
        return float(ours) == float(real)
    except (TypeError, ValueError):
        return str(ours) == real


def test_replica_dm3_structure_matches_the_real_slice(empiar: RunningEmpiar) -> None:
    """The tag paths and values that matter, compared with the real slice 0000's dump."""
    from ncempy.io import dm as ncempy_dm

    if REFERENCE.is_file():  # the facts above are the reference's
        reference = json.loads(REFERENCE.read_text())["full_original_tags"]
        assert {k: reference[k] for k in REAL_TAGS} == REAL_TAGS
    path = empiar.replica.folder / empiar.replica.names[0]
    assert path.read_bytes()[:4] == b"\x00\x00\x00\x03" and path.read_bytes()[8:12] == b"\x00\x00\x00\x01"
    with ncempy_dm.fileDM(str(path)) as f:
        ours = {"root" + k: v for k, v in f.allTags.items()}

    def renumber(key: str) -> str:  # ncempy numbers unnamed entries from 1, the reference (pyDM3reader) from 0
        parts = key.split(".")
        return ".".join(str(int(p) - 1) if p.isdigit() and i and parts[i - 1] in (
            "ImageList", "Dimension", "Dimensions", "Thumbnails") else p for i, p in enumerate(parts))
    ours = {renumber(k): v for k, v in ours.items()}
    for key, real in REAL_TAGS.items():
        if key.endswith(".Scale") and "Calibrations" in key:
            assert float(ours[key]) == pytest.approx(float(real), rel=1e-7), key
        else:
            assert _same(ours[key], real), (key, ours[key], real)
    height, width = empiar.replica.volume.shape[1:]
    assert (ours["root.ImageList.1.ImageData.Dimensions.0"], ours["root.ImageList.1.ImageData.Dimensions.1"]) == (
        width, height)


def test_plan_reports_files_bytes_and_requests_before_any_download(make_project, empiar: RunningEmpiar) -> None:
    from emdata.stages.fetch import plan_dataset

    cfg = project(make_project, empiar)
    plans = plan_dataset(cfg, KEY)
    assert [p.name for p in plans] == [f"{ACCESSION}.api.json", *empiar.replica.names, XML_NAME]
    for p in plans[1:]:
        assert p.size == p.to_transfer == empiar.server.local_path(DATA_PATH + p.name).stat().st_size
    assert sum(p.requests for p in plans) == 2 + 2 * (len(plans) - 1)  # API + listing; HEAD + GET per file
    assert {(r.method, r.path.endswith((".dm3", ".xml"))) for r in empiar.server.requests} == {
        ("GET", False), ("HEAD", True)}
    assert not cfg.raw_dir(KEY).exists()


def test_a_slice_left_out_of_the_listing_is_still_fetched(make_project, empiar: RunningEmpiar) -> None:
    hidden = empiar.replica.names[4]
    empiar.hide(hidden)
    assert hidden not in empiar.server.listing(DATA_PATH, empiar.replica.folder).decode()
    cfg = project(make_project, empiar)
    with h5py.File(build(cfg)) as f:
        np.testing.assert_array_equal(f["raw"][()], empiar.replica.volume)
    assert [r.method for r in empiar.server.requests_for(hidden)] == ["HEAD", "GET"]
    record = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())
    assert record["extra"]["unlisted"] == [hidden]
    assert record["files"][hidden]["sha256"] == sha256_file(empiar.replica.folder / hidden)


def test_slices_stack_in_natural_order_and_unlisted_unpadded_names_are_found(make_project, tmp_path) -> None:
    with running(tmp_path / "www", shape=(12, 19, 23), name_format="slice_{}.dm3") as run:
        run.hide("slice_10.dm3")  # a lexical sort would put slice_10 before slice_2
        cfg = project(make_project, run)
        with h5py.File(build(cfg)) as f:
            np.testing.assert_array_equal(f["raw"][()], run.replica.volume)
        native = json.loads(cfg.record_path(KEY).read_text())["native"]
        assert [s["file"] for s in native["slices"]] == [f"slice_{z}.dm3" for z in range(12)]


def test_z_spacing_is_the_record_slice_thickness_never_the_approach_value(make_project, tmp_path) -> None:
    with running(tmp_path / "www", shape=(5, 17, 13), slice_nm=40.0) as run:
        cfg = project(make_project, run)
        with h5py.File(build(cfg)) as f:
            np.testing.assert_allclose(f["raw"].attrs["resolution"], [40.0, PIXEL_NM, PIXEL_NM])
        assert json.loads(cfg.record_path(KEY).read_text())["native"]["voxel_size_from"]["z"] == \
            "ImageTags.SBFSEM.Record.Slice thickness"


@pytest.mark.parametrize("trust, expected", [("dm3", PIXEL_NM), ("api", 10.0)])
def test_geometry_trust_picks_the_pixel_size(make_project, empiar: RunningEmpiar, trust, expected) -> None:
    empiar.api_changes = {"pixel_width": 100.0, "pixel_height": 100.0}  # Å: 10 nm, the DM3 says 7.998 nm
    cfg = make_project({KEY: {**empiar_dataset(empiar.server.url), "geometry_trust": trust}})
    with h5py.File(build(cfg)) as f:
        np.testing.assert_allclose(f["raw"].attrs["resolution"], [50.0, expected, expected])
        origin = json.loads(f.attrs["geometry_origin"])["voxel_size_nm"]
    assert origin == "source"  # dm3 against api is the source's own choice; params said nothing
    yx = json.loads(cfg.record_path(KEY).read_text())["native"]["voxel_size_from"]["yx"]
    assert yx == {"dm3": "DM3 calibration", "api": "EMPIAR API pixel_height/pixel_width"}[trust]


def test_a_pixel_size_disagreement_is_one_line_naming_geometry_trust_and_both_values(make_project, empiar) -> None:
    empiar.api_changes = {"pixel_width": 100.0, "pixel_height": 100.0}
    with pytest.raises(FormatError) as err:
        build(project(make_project, empiar))
    text = str(err.value)
    assert "\n" not in text and "the DM3 calibration says [7.99825, 7.99825] nm but the EMPIAR API says [10, 10] nm" in text
    assert f"set datasets.{KEY}.geometry_trust to dm3 or api" in text


def test_params_voxel_size_with_geometry_trust_params_settles_a_pixel_size_disagreement(make_project, empiar) -> None:
    empiar.api_changes = {"pixel_width": 100.0, "pixel_height": 100.0}
    entry = {**empiar_dataset(empiar.server.url), "geometry_trust": "params", "voxel_size_nm": [50.0, 9.0, 9.0]}
    with h5py.File(build(make_project({KEY: entry}))) as f:
        np.testing.assert_allclose(f["raw"].attrs["resolution"], [50.0, 9.0, 9.0])
    with pytest.raises(FormatError, match="geometry_trust to dm3 or api"):  # params without a voxel size settle nothing
        build(make_project({KEY: {**empiar_dataset(empiar.server.url), "geometry_trust": "params"}}))


@pytest.mark.parametrize("value", ["dm3", None])
def test_the_old_pixel_size_trust_key_is_refused_with_the_new_one(make_project, empiar, value) -> None:
    cfg = project(make_project, empiar, pixel_size_trust=value)
    with pytest.raises(ConfigError) as err:
        resolve_dataset(cfg, KEY)
    text = str(err.value)
    assert "\n" not in text and f"datasets.{KEY}.source.pixel_size_trust: replaced by datasets.{KEY}.geometry_trust" in text
    assert ("`geometry_trust: dm3`" if value else "`geometry_trust`") in text and "params, source, dm3, api" in text


def test_geometry_trust_takes_only_the_names_the_source_offers(make_project, empiar) -> None:
    cfg = make_project({KEY: {**empiar_dataset(empiar.server.url), "geometry_trust": "omero"}})
    with pytest.raises(ConfigError, match=rf"datasets.{KEY}.geometry_trust: expected one of params, source, dm3, api"):
        resolve_dataset(cfg, KEY)


def test_record_has_doi_licence_instrument_detector_and_native_metadata(make_project, empiar) -> None:
    cfg = project(make_project, empiar)
    build(cfg)
    record = json.loads(cfg.record_path(KEY).read_text())
    assert record["doi"] == "10.6019/EMPIAR-11759" and record["license"].startswith("CC0")
    assert record["accession"] == ACCESSION and record["modality"] == "SBF-SEM"
    desc = record["description"]
    assert (desc["instrument"], desc["detector"], desc["entry_doi"]) == ("FEI Quanta", "3VBSED", "10.6019/EMPIAR-11759")
    np.testing.assert_allclose(record["voxel_size_nm"], [50.0, 7.99825, 7.99825], rtol=1e-6)
    native = record["native"]
    assert native["empiar_entry"]["imagesets"][0]["image_width"] == "37"
    assert native["dm3_tags"]["ImageList"]["TagGroup0"]["ImageTags"]["SBFSEM"]["Record"]["Slice thickness"] == 50.0
    times = [s["time"] for s in native["slices"]]
    assert len(times) == 11 and times[0] == "22:27:16" and len(set(times)) == 11
    assert not (cfg.raw_dir(KEY) / "trakem2").exists()


def test_the_trakem2_tree_is_fetched_only_when_asked(make_project, empiar: RunningEmpiar) -> None:
    from emdata.stages.fetch import fetch_dataset

    cfg = project(make_project, empiar, include_folders=["trakem2"])
    fetch_dataset(cfg, KEY)
    raw = cfg.raw_dir(KEY)
    assert (raw / "trakem2/trakem2.1528744716.1/trakem2.masks/mask.0.zip").read_bytes() == b"replica\n"
    assert (raw / XML_NAME).is_file()


# -- failures: one line naming the dataset and the file or URL, non-zero exit, outputs untouched ----


def _break(run: RunningEmpiar, fault: str) -> str:
    """Apply ``fault`` to the replica; return the text the error line must contain."""
    names, folder = run.replica.names, run.replica.folder
    if fault == "missing":
        for name in (names[3], names[-1]):
            (folder / name).unlink()
        return f"missing: {names[3]}, {names[-1]}"
    if fault == "api_html":
        run.api_html = True
        return f"{run.server.url}/empiar/api/entry/{ACCESSION}/: the response is not JSON"
    if fault == "ragged":
        z = 5
        write_slice(folder / names[z], run.replica.volume[z][:, :-2], z)
        return f"{names[z]}: the slice is (45, 35) uint8"
    if fault == "corrupt_header":
        data = bytearray((folder / names[6]).read_bytes())
        data[:4] = b"\x00\x00\x00\x07"
        (folder / names[6]).write_bytes(bytes(data))
        return f"{names[6]}: not a readable DM3/DM4 file"
    if fault == "pixel_mismatch":
        run.api_changes = {"pixel_width": 90.0, "pixel_height": 90.0}
        return f"{names[0]}: the DM3 calibration says [7.99825, 7.99825] nm but the EMPIAR API says [9, 9] nm"
    raise AssertionError(fault)


# fetch parses every slice's header, so a ragged or corrupt slice is refused before it is stored
@pytest.mark.parametrize("fault, stage", [("missing", "fetch"), ("api_html", "fetch"), ("ragged", "fetch"),
                                          ("corrupt_header", "fetch"), ("pixel_mismatch", "normalize")])
def test_failures_are_one_line_and_leave_outputs_untouched(make_project, empiar, fault, stage) -> None:
    cfg = project(make_project, empiar)
    build(cfg)
    outputs = [cfg.raw_dir(KEY) / "source.json", cfg.processed_path(KEY), cfg.record_path(KEY)]
    before = [sha256_file(p) for p in outputs]
    expected = _break(empiar, fault)
    params = yaml.safe_load((cfg.root / "params.yaml").read_text())
    params["datasets"][KEY]["source"]["extra_files"] = []  # new source params: the next fetch runs again
    (cfg.root / "params.yaml").write_text(yaml.safe_dump(params))
    env_cmd = [sys.executable, "-m", "emdata"]
    if stage == "normalize":
        ok = subprocess.run(env_cmd + ["fetch", KEY], cwd=cfg.root, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        outputs = outputs[1:]
        before = before[1:]
    proc = subprocess.run(env_cmd + [stage, KEY], cwd=cfg.root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"emdata: error: {KEY}: ") and expected in lines[0], lines[0]
    assert [sha256_file(p) for p in outputs] == before
    if fault in ("ragged", "corrupt_header"):  # the bad slice is not kept for a resume: the next fetch gets it again
        bad = expected.split(":")[0]
        assert not (cfg.partial_dir(KEY) / bad).exists() and (cfg.partial_dir(KEY) / empiar.replica.names[0]).exists()


@pytest.mark.dvc
def test_dvc_repro_builds_empiar_11759_from_the_replica(tmp_path: Path) -> None:
    """The real params entry, pointed at the replica, through `dvc repro` (fetch, normalize, summarize)."""
    from emdata.testing.demo import copy_repository, point_params_at_replicas
    from emdata.testing.dvc import dvc, git, offline_env

    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    copy_repository(REPO, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"] = {KEY: params["datasets"][KEY]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with running(tmp_path / "www", shape=(16, 53, 47)) as run:
        point_params_at_replicas(repo / "params.yaml", {"empiar": run})
        git(["init", "-q", "-b", "main"], repo, env)
        git(["add", "-A"], repo, env)
        git(["commit", "-qm", "params"], repo, env)
        dvc(["repro"], repo, env)
        expected = run.replica.volume
    with h5py.File(repo / "data" / "processed" / f"{KEY}.h5") as f:
        np.testing.assert_array_equal(f["raw"][()], expected)
        np.testing.assert_allclose(f["raw"].attrs["resolution"], [50.0, 7.99825, 7.99825], rtol=1e-6)
    record = json.loads((repo / "data" / "metadata" / f"{KEY}.json").read_text())
    assert (record["doi"], record["accession"]) == ("10.6019/EMPIAR-11759", ACCESSION) and "CC0" in record["license"]
    assert (record["description"]["instrument"], record["description"]["detector"]) == ("FEI Quanta", "3VBSED")
    summary = (repo / "METADATA_SUMMARY.md").read_text()
    assert f"`{KEY}`" in summary and f"thumbnails/{KEY}_xy.png" in summary
    assert (repo / "thumbnails" / f"{KEY}_xz.png").is_file()
