"""Geometry: the source's voxel size and offset, params overriding, disagreements refused."""

from __future__ import annotations

import pytest

from emdata.errors import ConfigError, FormatError
from emdata.core.geometry import pick, resolve


def _resolve(pv=None, po=None, sv=None, so=None, trust=None):
    return resolve("ds", params_voxel=pv, params_offset=po, source_voxel=sv, source_offset=so, trust=trust)


def test_source_geometry_is_used_when_params_say_nothing() -> None:
    g = _resolve(sv=(30.0, 4.0, 4.0), so=(90.0, -8.0, 12.0))
    assert g.voxel_size_nm == (30.0, 4.0, 4.0) and g.offset_nm == (90.0, -8.0, 12.0)
    assert g.origin == {"voxel_size_nm": "source", "offset_nm": "source"}


def test_params_alone_are_used_when_the_format_has_none() -> None:
    g = _resolve(pv=(5.0, 5.0, 5.0), po=(0.0, 0.0, 0.0))
    assert g.voxel_size_nm == (5.0, 5.0, 5.0) and g.origin["voxel_size_nm"] == "params"


@pytest.mark.parametrize("missing", ["voxel_size_nm", "offset_nm"])
def test_missing_in_both_is_a_config_error_naming_the_key(missing) -> None:
    kwargs = {"pv": (5.0, 5.0, 5.0), "po": (0.0, 0.0, 0.0)}
    kwargs["pv" if missing == "voxel_size_nm" else "po"] = None
    with pytest.raises(ConfigError, match=f"datasets.ds.{missing}: the source does not report it"):
        _resolve(**kwargs)


def test_within_one_percent_the_params_override_wins_quietly() -> None:
    g = _resolve(pv=(11.84, 8.0, 8.0), sv=(11.840000000000002, 8.05, 8.0), po=(0, 0, 0))
    assert g.voxel_size_nm == (11.84, 8.0, 8.0) and g.origin["voxel_size_nm"] == "params (source agrees)"


def test_disagreement_names_both_values_unless_trust_is_set() -> None:
    with pytest.raises(FormatError) as err:
        _resolve(pv=(10.0, 5.0, 5.0), sv=(10.0, 5.2, 5.0), po=(0, 0, 0))
    text = str(err.value)
    assert "params.yaml says [10, 5, 5] nm but the source says [10, 5.2, 5] nm" in text
    assert "geometry_trust" in text
    assert _resolve(pv=(10, 5, 5), sv=(10, 5.2, 5), po=(0, 0, 0), trust="source").voxel_size_nm == (10, 5.2, 5)
    assert _resolve(pv=(10, 5, 5), sv=(10, 5.2, 5), po=(0, 0, 0), trust="params").voxel_size_nm == (10, 5, 5)


def test_offsets_near_zero_compare_against_the_voxel_size() -> None:
    # 0 vs 0.01 nm is far below a voxel: no disagreement, whatever the relative difference.
    assert _resolve(pv=(8, 8, 8), po=(0, 0, 0), so=(0.01, 0, 0)).offset_nm == (0, 0, 0)
    with pytest.raises(FormatError, match="offset_nm"):
        _resolve(pv=(8, 8, 8), po=(0, 0, 0), so=(16.0, 0, 0))


# -- pick: one choice among named candidates ---------------------------------------------------------


def test_pick_prefers_the_first_candidate_that_agrees_and_names_who_agrees() -> None:
    assert pick("v", {"omero": (20.0, 20.0), "imagej": (20.1, 20.0)}, None, key="ds",
                labels={"imagej": "ImageJ tags"}) == ((20.0, 20.0), "omero (ImageJ tags agree)", "omero")
    assert pick("v", {"dm3": None, "api": (8.0, 8.0)}, None, key="ds") == ((8.0, 8.0), "api", "api")
    assert pick("v", {"a": None, "b": None}, "a", key="ds") == (None, "none", None)


def test_pick_refuses_a_disagreement_in_one_line_naming_geometry_trust_and_every_value() -> None:
    with pytest.raises(FormatError) as err:
        pick("voxel size", {"dm3": (8.0, 8.0), "api": (10.0, 10.0)}, None, key="ds", where="f.dm3",
             labels={"dm3": "the DM3 calibration", "api": "the EMPIAR API"})
    assert str(err.value) == ("ds: f.dm3: the DM3 calibration says [8, 8] nm but the EMPIAR API says [10, 10] nm; "
                              "set datasets.ds.geometry_trust to dm3 or api")


@pytest.mark.parametrize("trust, value", [("dm3", (8.0, 8.0)), ("api", (10.0, 10.0)), ("params", (8.0, 8.0))])
def test_geometry_trust_picks_the_candidate_it_names(trust, value) -> None:
    choice = pick("v", {"dm3": (8.0, 8.0), "api": (10.0, 10.0)}, trust, key="ds", trusted_by={"dm3": ("params",)})
    other = "api differs" if choice.name == "dm3" else "dm3 differs"
    assert choice == (value, f"{choice.name} ({other}, geometry_trust: {trust})", "dm3" if trust != "api" else "api")
    with pytest.raises(FormatError, match="geometry_trust to dm3 or api"):  # "source" names neither
        pick("v", {"dm3": (8.0, 8.0), "api": (10.0, 10.0)}, "source", key="ds")


def test_a_source_candidate_trusted_makes_the_source_win_over_params() -> None:
    g = resolve("ds", params_voxel=(10, 5, 5), params_offset=(0, 0, 0), source_voxel=(10, 5.2, 5),
                source_offset=None, trust="api", source_names=("dm3", "api"))
    assert g.voxel_size_nm == (10, 5.2, 5) and g.origin["voxel_size_nm"] == "source (params differ, geometry_trust: api)"


def test_offsets_are_compared_in_voxels_of_the_chosen_size() -> None:
    # 100000 vs 100800 nm is 0.8 % of the offset but 100 voxels of 8 nm: apart
    with pytest.raises(FormatError, match=r"params.yaml says \[0, 100000\] nm but the source says \[0, 100800\] nm"):
        pick("offset_nm", {"params": (0.0, 100000.0), "source": (0.0, 100800.0)}, None, key="ds", scale=(8.0, 8.0))
    # 0.07 nm at 8 nm voxels is under 1 % of a voxel: the same grid, whatever the offset's size
    near = pick("offset_nm", {"params": (0.0, 8e6), "source": (0.0, 8e6 + 0.07)}, None, key="ds", scale=(8.0, 8.0))
    assert near.origin == "params (source agrees)"
    with pytest.raises(FormatError):  # 0.07 nm is more than 1 % of a 4 nm voxel
        pick("offset_nm", {"params": (0.0, 8e6), "source": (0.0, 8e6 + 0.07)}, None, key="ds", scale=(4.0, 4.0))
