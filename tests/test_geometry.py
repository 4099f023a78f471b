"""Geometry: the source's voxel size and offset, params overriding, disagreements refused."""

from __future__ import annotations

import pytest

from emdata.errors import ConfigError, FormatError
from emdata.core.geometry import resolve


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
