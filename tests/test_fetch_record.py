"""The fetch record: one definition of "fetched", specs compared as JSON sees them."""

from __future__ import annotations

import numpy as np
import pytest

from emdata.errors import ConfigError
from emdata.fetch_context import FetchContext
from emdata.fetch_record import FetchedFile, FetchRecord, fetched, safe_relpath


def test_a_spec_with_tuples_is_fetched_after_a_round_trip_through_json(tmp_path) -> None:
    spec = {"kind": "toy", "roi": (0, 64, 128), "level": "s2"}  # what a Params.to_dict() may return
    ctx = FetchContext(dataset="d", kind="toy", spec=spec, dest=tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.bin").write_bytes(b"12345")
    record = ctx.record({"a/b.bin": FetchedFile("http://x/b", 5)}, extra={"count": np.int64(3)})
    record.write(tmp_path)
    assert FetchRecord.load(tmp_path).extra == {"count": 3}
    assert fetched(tmp_path, spec) is not None
    assert fetched(tmp_path, {**spec, "level": "s3"}) is None
    (tmp_path / "a" / "b.bin").write_bytes(b"1234")
    assert fetched(tmp_path, spec) is None  # a file of another size


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "source.json", "a\nb", "", "."])
def test_unsafe_relative_paths_are_refused(name) -> None:
    with pytest.raises(ConfigError):
        safe_relpath(name)
