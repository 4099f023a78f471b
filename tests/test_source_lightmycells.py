"""Light My Cells specifics (the shared contract runs for every registered kind in test_contract.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from emdata.params.config import load_config
from emdata.sources.dataset import resolve_dataset
from emdata.errors import FormatError
from emdata.testing.lightmycells import (
    DAMAGED_OME,
    HOSTILE_DOTDOT,
    HOSTILE_LINK,
    REPLICA,
    STUDIES,
    lightmycells_dataset,
    served_path,
)
from tests.conftest import REPO


@pytest.fixture
def lmc(tmp_path: Path):
    with REPLICA.start(tmp_path / "replica") as running:
        yield running


def _project(root: Path, datasets: dict, **normalize) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = {"normalize": {"chunks": [8, 16, 16], "image_chunks": [16, 32], **normalize}, "datasets": datasets}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=root, capture_output=True, text=True,
                          timeout=120)


def test_real_params_point_at_the_public_seafile_share() -> None:
    cfg = load_config(REPO)
    keys = [k for k in cfg.datasets if cfg.datasets.kind_of(k) == "lightmycells"]
    assert keys
    for key in keys:
        spec = resolve_dataset(cfg, key).source
        assert spec.study.url == (f"https://seafile.lirmm.fr/d/123f71e12bf24db59d84/files/?p=%2F"
                                  f"Study_{spec.number}.tar.gz&dl=1")
        assert key == f"lightmycells_study_{spec.number}"  # one dataset (one DVC stage) per study


def test_plan_asks_the_size_through_the_redirect_and_downloads_nothing(lmc, tmp_path) -> None:
    from emdata.stages.fetch import plan_dataset

    root = _project(tmp_path / "p", {"lightmycells_study_1": lightmycells_dataset(lmc.share_url, 1)})
    (plan,) = plan_dataset(load_config(root), "lightmycells_study_1")
    served = lmc.server.local_path(served_path("Study_1.tar.gz"))
    assert plan.size == served.stat().st_size and plan.state == "new"
    assert {r.method for r in lmc.server.requests} == {"HEAD"}
    assert [r.status for r in lmc.server.requests] == [302, 200]  # the share redirects to the file server


@pytest.mark.parametrize("study, member, what", [
    (HOSTILE_DOTDOT, "../escaped.txt", "'..' part"),
    (HOSTILE_LINK, f"Study_{HOSTILE_LINK}/image_9_BF_z0.ome.tiff", "symbolic link"),
])
def test_a_hostile_tarball_writes_nothing_outside_and_fails_on_one_line(lmc, tmp_path, study, member, what) -> None:
    root = _project(tmp_path / "work" / "p", {"evil": lightmycells_dataset(lmc.share_url, study)})
    proc = _cli(root, "fetch", "evil")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("emdata: error: evil: ") and repr(member) in lines[0] and what in lines[0]
    assert not (root / "data" / "raw" / "evil").exists()
    outside = [p for p in (tmp_path / "work").rglob("*") if p.name in ("escaped.txt",) or p.is_symlink()]
    assert outside == []
    assert not (root / "data" / "raw" / "escaped.txt").exists() and not (tmp_path / "work" / "escaped.txt").exists()


def test_unexpected_members_are_listed_not_dropped(lmc, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    root = _project(tmp_path / "p", {"lightmycells_study_2": lightmycells_dataset(lmc.share_url, 2)})
    cfg = load_config(root)
    raw = fetch_dataset(cfg, "lightmycells_study_2").raw_dir
    record = json.loads((raw / "source.json").read_text())
    assert record["extra"]["skipped"] == [{"name": "Study_2/notes.txt", "size": 25, "reason": "unexpected name"}]
    (source,) = record["extra"]["sources"]
    served = lmc.server.local_path(served_path("Study_2.tar.gz")).read_bytes()
    assert source["size"] == len(served) and source["sha256"] == __import__("hashlib").sha256(served).hexdigest()
    assert sorted(p.name for p in raw.iterdir()) == sorted([*record["files"], "source.json"])
    assert not list(raw.glob("*.tar.gz*")) and "notes.txt" not in record["files"]


def test_member_and_total_caps_are_enforced_naming_the_member(lmc, tmp_path, monkeypatch) -> None:
    from emdata.stages.fetch import fetch_dataset

    entry = lightmycells_dataset(lmc.share_url, 1)
    entry["source"]["limits"] = {"member_mb": 1, "total_gb": 1}
    root = _project(tmp_path / "p", {"s": entry})
    fetch_dataset(load_config(root), "s")  # every replica file is far below 1 MiB
    import emdata.sources.lightmycells as lmc_source

    monkeypatch.setattr(lmc_source, "MIB", 100)  # a per-member cap of 100 bytes
    root2 = _project(tmp_path / "p2", {"s": entry})
    with pytest.raises(FormatError, match=r"member 'Study_1/image_3_BF_z0.ome.tiff'.*per-member cap of 100"):
        fetch_dataset(load_config(root2), "s")
    assert not (root2 / "data" / "raw" / "s").exists()
    monkeypatch.setattr(lmc_source, "MIB", 1 << 20)
    monkeypatch.setattr(lmc_source, "GIB", 9000)  # a total cap of 9000 bytes: passed by the second member
    with pytest.raises(FormatError, match=r"member 'Study_1/image_3_BF_z1.ome.tiff'.*total cap of 9000"):
        fetch_dataset(load_config(root2), "s")


def test_a_truncated_tarball_fails_cleanly_and_the_next_run_downloads_it_again(lmc, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    path = served_path("Study_1.tar.gz")
    size = lmc.server.local_path(path).stat().st_size
    lmc.server.truncate(path, size // 2)  # served consistently short: only the archive can tell
    root = _project(tmp_path / "p", {"lightmycells_study_1": lightmycells_dataset(lmc.share_url, 1)})
    proc = _cli(root, "fetch", "lightmycells_study_1")
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "damaged or truncated" in proc.stderr and "Study_1.tar.gz" in proc.stderr
    assert not (root / "data" / "raw" / "lightmycells_study_1").exists()
    partial = root / "data" / "raw" / ".partial" / "lightmycells_study_1"
    assert not list(partial.glob("Study_1.tar.gz*"))  # damaged bytes are not resumed from
    lmc.server.faults.truncate.clear()
    result = fetch_dataset(load_config(root), "lightmycells_study_1")
    assert not result.up_to_date and (result.raw_dir / "image_3_BF_z0.ome.tiff").is_file()


def test_a_corrupt_ome_xml_is_one_line_and_leaves_the_last_outputs(lmc, tmp_path) -> None:
    entry = lightmycells_dataset(lmc.share_url, 1)
    root = _project(tmp_path / "p", {"lightmycells_study_1": entry})
    assert _cli(root, "fetch", "lightmycells_study_1").returncode == 0
    assert _cli(root, "normalize", "lightmycells_study_1").returncode == 0
    h5 = root / "data" / "processed" / "lightmycells_study_1.h5"
    record = root / "data" / "metadata" / "lightmycells_study_1.json"
    before = (h5.read_bytes(), record.read_bytes())
    entry["source"]["study"] = {"file": f"Study_{DAMAGED_OME}.tar.gz"}
    _project(root, {"lightmycells_study_1": entry})
    assert _cli(root, "fetch", "lightmycells_study_1").returncode == 0  # the bytes are as served
    proc = _cli(root, "normalize", "lightmycells_study_1")
    assert proc.returncode == 6
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "OME-XML does not parse" in lines[0] and "image_3_BF_z0.ome.tiff" in lines[0]
    assert (h5.read_bytes(), record.read_bytes()) == before
    assert not list(h5.parent.glob(".*.tmp"))


def test_the_table_says_which_targets_each_image_has(lmc, tmp_path) -> None:
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    root = _project(tmp_path / "p", {"lightmycells_study_1": lightmycells_dataset(lmc.share_url, 1)})
    cfg = load_config(root)
    fetch_dataset(cfg, "lightmycells_study_1")
    with h5py.File(normalize_dataset(cfg, "lightmycells_study_1")) as f:
        table = f["table"][()]
        assert [v.decode() for v in table["image"]] == [str(s.id) for s in STUDIES[1]]
        for row, spec in zip(table, STUDIES[1]):
            assert (row["height"], row["width"]) == spec.shape
            assert row["z_planes"] == sum(spec.inputs.values())
            assert row["pixel_size_x_nm"] == pytest.approx(spec.pixel_nm)
            for organelle in ("Nucleus", "Mitochondria", "Tubulin", "Actin"):
                assert bool(row[f"has_{organelle}"]) == (organelle in spec.targets)
                assert (f"images/{spec.id}/targets/{organelle}" in f) == (organelle in spec.targets)
        bf = f["images/3/inputs/BF_z1"]
        assert bf.ndim == 2 and bf.chunks == (16, 32) and bf.attrs["axes"] == "yx"
        np.testing.assert_allclose(bf.attrs["element_size_um"], [0.1625, 0.1625])
        assert json.loads(bf.attrs["channels"]) == ["BF"] and bf.attrs["file"] == "image_3_BF_z1.ome.tiff"
    record = json.loads(cfg.record_path("lightmycells_study_1").read_text())
    assert record["layout"] == "collection" and record["n_images"] == 3
    assert [r["image"] for r in record["table"]] == ["3", "11", "12"]
    assert record["roles"]["targets/Mitochondria"]["count"] == 2


def test_params_override_a_pixel_size_only_when_trusted(lmc, tmp_path) -> None:
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    entry = lightmycells_dataset(lmc.share_url, 2)
    entry["voxel_size_nm"] = [1.0, 108.3, 108.3]  # agrees with the OME-XML (z is not used)
    root = _project(tmp_path / "p", {"lightmycells_study_2": entry})
    fetch_dataset(load_config(root), "lightmycells_study_2")
    with h5py.File(normalize_dataset(load_config(root), "lightmycells_study_2")) as f:
        assert json.loads(f["images/1/inputs/PC_z0"].attrs["geometry_origin"])["voxel_size_nm"] == \
            "params (source agrees)"
    entry["voxel_size_nm"] = [1.0, 200.0, 200.0]
    _project(root, {"lightmycells_study_2": entry})
    with pytest.raises(FormatError, match=r"params.yaml says \[200, 200\] nm but the source says \[108.3, 108.3\]"):
        normalize_dataset(load_config(root), "lightmycells_study_2")


OME = ('<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" '
       'DimensionOrder="XYZCT" Type="uint16" SizeX="53" SizeY="37" SizeZ="1" SizeC="1" SizeT="1"{extra}>'
       '<Channel ID="Channel:0:0" Name="BF"/></Pixels></Image></OME>')


@pytest.mark.parametrize("extra, expected", [
    (' PhysicalSizeX="0.1625" PhysicalSizeY="0.1625"', (162.5, 162.5)),  # the schema's default unit is µm
    (' PhysicalSizeX="650" PhysicalSizeXUnit="Å" PhysicalSizeY="0.07" PhysicalSizeYUnit="µm"', (70.0, 65.0)),
    ('', None),
])
def test_ome_pixel_sizes_become_nm(extra, expected) -> None:
    from emdata.formats.ometiff import parse_ome_xml

    info = parse_ome_xml(OME.format(extra=extra), "ds", Path("a.ome.tiff"))
    assert info.pixel_size_nm == (pytest.approx(expected) if expected else None)
    assert info.shape == (37, 53) and info.dtype == "uint16" and info.channels == ("BF",)


@pytest.mark.parametrize("xml, problem", [
    (OME.format(extra="").replace('SizeZ="1"', 'SizeZ="3"'), "T = C = Z = 1"),
    (OME.format(extra=' PhysicalSizeX="1" PhysicalSizeXUnit="furlong" PhysicalSizeY="1"'), "'furlong'"),
    (OME.format(extra=' PhysicalSizeX="1"'), "only one of X and Y"),
    (OME.format(extra="").replace('Type="uint16"', 'Type="bit"'), "Type='bit'"),
    (OME.format(extra="")[:200], "does not parse"),
])
def test_ome_xml_that_is_not_one_plane_is_refused(xml, problem) -> None:
    from emdata.formats.ometiff import parse_ome_xml

    with pytest.raises(FormatError, match=problem):
        parse_ome_xml(xml, "ds", Path("a.ome.tiff"))


def test_without_a_pixel_size_params_must_give_it(lmc, tmp_path) -> None:
    from emdata.h5.collection import CollectionItem
    from emdata.errors import ConfigError
    from emdata.stages.normalize.collection import item_geometry

    root = _project(tmp_path / "p", {"s": lightmycells_dataset(lmc.share_url, 1)})
    item = CollectionItem("1", "inputs/BF_z0", lambda: None, (3, 4), np.dtype("u2"))  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError, match=r"datasets.s.voxel_size_nm: the source does not report it"):
        item_geometry(resolve_dataset(load_config(root), "s"), item)
