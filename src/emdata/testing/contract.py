"""The contract every source kind passes against its registered replica (like bioio's conformance).

Layers: :class:`CoreContract` holds what every source must do whatever its transport (exact
round trip of an odd-shaped, coordinate-encoded volume; a second fetch is a no-op; JSON-safe
native metadata; geometry reported by the source or overridden by params). Transport mixins add
the failure behaviour of one protocol: :class:`HttpContract` (drops, 503 + Retry-After,
truncation, wrong length, 404) and :class:`S3Contract` (for S3 sources). ``tests/test_contract.py``
runs them for every kind in :mod:`emdata.testing.registry`, with no per-kind code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from ..config import Config
from ..errors import IntegrityError
from ..io.http import HttpClient, RetryPolicy

FAST_RETRIES = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, connect_timeout=2, read_timeout=5)


@dataclass
class SourceCase:
    """One dataset of a source, served by a running replica, with what it must round-trip to."""

    cfg: Config
    key: str
    server: Any  # the replica's server: request log (``requests``, ``clear_log``) and faults
    expected: dict[str, np.ndarray]  # "raw" and "labels/<name>" -> voxels
    big_file: str  # URL path (or key) of the largest file, for fault injection
    reload: Callable[[], Config]  # re-read params.yaml after a test edits it
    voxel_size_nm: tuple[float, float, float] = (5.0, 5.0, 5.0)
    offset_nm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    files: dict[str, str] = field(default_factory=dict)  # raw-folder relpath -> URL path (ReplicaCase.files)

    def relpath(self, url_path: str) -> str:
        """Where the file served at ``url_path`` lands in the raw folder (default: its base name)."""
        for rel, served in self.files.items():
            if urllib.parse.unquote(served) == urllib.parse.unquote(url_path):
                return rel
        return urllib.parse.unquote(url_path.rsplit("/", 1)[-1])


def client_for(case: SourceCase, sleeps: list[float] | None = None) -> HttpClient:
    sleep = sleeps.append if sleeps is not None else (lambda s: None)
    return HttpClient(case.key, policy=FAST_RETRIES, sleep=sleep, seed=0)


class CoreContract:
    """What every source does, whatever its transport."""

    @pytest.fixture
    def case(self) -> SourceCase:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def _fetch(self, case: SourceCase, sleeps: list[float] | None = None, policy: RetryPolicy = FAST_RETRIES):
        from ..pipeline import fetch_dataset

        return fetch_dataset(case.cfg, case.key, http_factory=lambda: client_for(case, sleeps), policy=policy)

    def _normalize(self, case: SourceCase) -> Path:
        from ..normalize import normalize_dataset

        return normalize_dataset(case.cfg, case.key)

    def test_round_trip_is_exact(self, case: SourceCase) -> None:
        import h5py

        self._fetch(case)
        with h5py.File(self._normalize(case), "r") as f:
            for name, array in case.expected.items():
                got = f[name][()]
                assert got.shape == array.shape, name
                assert got.dtype == array.dtype.newbyteorder("<") or got.dtype == array.dtype, name
                np.testing.assert_array_equal(got, array, err_msg=name)

    def test_second_fetch_makes_no_request(self, case: SourceCase) -> None:
        first = self._fetch(case)
        assert not first.up_to_date
        case.server.clear_log()
        second = self._fetch(case)
        assert second.up_to_date and second.requests == 0
        assert case.server.requests == []

    def test_geometry_is_reported_or_overridden(self, case: SourceCase) -> None:
        """The HDF5 records the source's geometry (or the params override) and where it came from."""
        import h5py

        self._fetch(case)
        with h5py.File(self._normalize(case), "r") as f:
            np.testing.assert_allclose(f["raw"].attrs["resolution"], case.voxel_size_nm)
            np.testing.assert_allclose(f["raw"].attrs["offset"], case.offset_nm)
            origin = json.loads(f.attrs["geometry_origin"])
            assert set(origin) == {"voxel_size_nm", "offset_nm"}
        # An override in params that disagrees by more than 1 % is refused unless params say whom to trust.
        from ..errors import FormatError
        from ..normalize import dataset_geometry
        from ..sources import get_source

        reported = self._reported_voxel_size(case)
        if reported is None:  # the format carries none: params must give it (tested in test_geometry)
            return
        wrong = [v * 1.5 for v in reported]
        _edit_dataset(case, voxel_size_nm=wrong, geometry_trust=None)
        ds = case.cfg.dataset(case.key)
        with get_source(ds.source_kind).open_volume(ds.source, case.cfg.raw_dir(case.key), case.key) as volume:
            with pytest.raises(FormatError, match="params.yaml says"):
                dataset_geometry(case.cfg, case.key, volume)
        _edit_dataset(case, geometry_trust="params")
        ds = case.cfg.dataset(case.key)
        with get_source(ds.source_kind).open_volume(ds.source, case.cfg.raw_dir(case.key), case.key) as volume:
            assert list(dataset_geometry(case.cfg, case.key, volume).voxel_size_nm) == wrong

    def _reported_voxel_size(self, case: SourceCase) -> tuple[float, ...] | None:
        from ..sources import get_source

        ds = case.cfg.dataset(case.key)
        with get_source(ds.source_kind).open_volume(ds.source, case.cfg.raw_dir(case.key), case.key) as volume:
            return volume.voxel_size_nm

    def test_metadata_is_json_serializable(self, case: SourceCase) -> None:
        from ..sources import get_source

        self._fetch(case)
        ds = case.cfg.dataset(case.key)
        native = get_source(ds.source_kind).read_metadata(ds.source, case.cfg.raw_dir(case.key), case.key)
        assert json.loads(json.dumps(native)) == native
        assert native


class S3Contract:
    """Failure behaviour of sources that read objects from S3 (anonymously, as public data is served).

    ``case.server`` is an :class:`~emdata.testing.s3.S3Front` (request log, faults per object path
    ``/<bucket>/<key>``); ``case.big_file`` is the path of the largest data object and
    ``case.files`` maps raw-folder paths to the data objects' paths (metadata a source reads
    again on every run is not in it). A second fetch lists and requests nothing (CoreContract).
    """

    case: Callable[..., SourceCase]
    _fetch: Callable[..., Any]

    @staticmethod
    def _object_gets(case: SourceCase, path: str | None = None) -> list[Any]:
        """GET requests for objects (not listings, which are GETs of the bucket with a query)."""
        return [r for r in case.server.requests if r.method == "GET" and "list-type" not in r.query
                and r.path.count("/") >= 2 and (path is None or r.path == path)]

    def _local(self, case: SourceCase, path: str) -> Path:
        return case.cfg.raw_dir(case.key) / case.relpath(path)

    def test_dropped_connection_retries_that_object_only(self, case: SourceCase) -> None:
        case.server.drop_after(case.big_file, nbytes=1000, times=1)
        self._fetch(case)
        gets = self._object_gets(case, case.big_file)
        assert len(gets) == 2 and gets[0].sent == 1000
        assert gets[1].status == 200 or gets[1].headers.get("Range") == "bytes=1000-"
        others = [r.path for r in self._object_gets(case) if r.path != case.big_file]
        assert len(others) == len(set(others)), "only the dropped object may be requested twice"
        assert self._local(case, case.big_file).read_bytes() == case.server.object_bytes(case.big_file)

    def test_slowdown_is_retried_with_backoff(self, case: SourceCase) -> None:
        policy = RetryPolicy(attempts=4, base_delay=0.2, max_delay=1.0, connect_timeout=2, read_timeout=5)
        case.server.fail(case.big_file, status=503, times=2, code="SlowDown")
        self._fetch(case, policy=policy)
        gets = self._object_gets(case, case.big_file)
        assert [g.status for g in gets] == [503, 503, 200]
        waits = [b.time - a.time for a, b in zip(gets, gets[1:])]
        assert waits[0] >= policy.base_delay / 2 and waits[1] >= policy.base_delay, waits  # grows: backoff
        assert self._local(case, case.big_file).read_bytes() == case.server.object_bytes(case.big_file)

    def test_interrupted_fetch_resumes_without_fetching_finished_objects(self, case: SourceCase) -> None:
        from ..errors import FetchError

        case.server.fail(case.big_file, status=500, times=1000)
        with pytest.raises(FetchError):
            self._fetch(case)
        assert not case.cfg.raw_dir(case.key).exists()  # nothing that looks complete
        data = set(case.files.values())
        first = {r.path for r in self._object_gets(case) if r.status == 200} & data
        case.server.clear_faults()
        case.server.clear_log()
        self._fetch(case)
        second = [r.path for r in self._object_gets(case) if r.path in data]
        assert not first & set(second), "objects finished by the interrupted run were fetched again"
        assert sorted(second) == sorted(data - first)
        for path in data:
            assert self._local(case, path).read_bytes() == case.server.object_bytes(path)

    def test_missing_object_is_one_line_naming_dataset_bucket_and_key(self, case: SourceCase) -> None:
        case.server.hide(case.big_file)  # listed, but gone when asked for: 404 NoSuchKey
        bucket, _, key = case.big_file.lstrip("/").partition("/")
        proc = subprocess.run([sys.executable, "-m", "emdata", "fetch", case.key], cwd=case.cfg.root,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        # Progress lines of what was fetched before may precede it; the error itself is one line.
        lines = [line for line in proc.stderr.strip().splitlines() if not re.fullmatch(r"emdata: .*: \d+%", line)]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("emdata: error: ")
        assert case.key in lines[0] and bucket in lines[0] and key in lines[0], lines[0]
        assert not case.cfg.raw_dir(case.key).exists()

    def test_credentials_in_the_environment_are_neither_needed_nor_used(
            self, case: SourceCase, monkeypatch: pytest.MonkeyPatch) -> None:
        # Wrong keys, and an instance-metadata endpoint that would show up in the log if probed.
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEMDATAWRONGKEY00")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        monkeypatch.setenv("AWS_SESSION_TOKEN", "wrong-token")
        monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", case.server.url + "/")
        self._fetch(case)  # the front refuses signed requests (403 InvalidAccessKeyId), as AWS does
        for r in case.server.requests:
            assert "Authorization" not in r.headers and "X-Amz-Security-Token" not in r.headers, r
            assert not r.path.startswith("/latest/"), r
        assert case.cfg.raw_dir(case.key).is_dir()


class HttpContract:
    """Failure behaviour of sources that download files over HTTP(S)."""

    case: Callable[..., SourceCase]
    _fetch: Callable[..., Any]

    def test_interrupted_body_resumes_with_range(self, case: SourceCase) -> None:
        case.server.drop_after(case.big_file, nbytes=1000, times=1)
        self._fetch(case)
        gets = [r for r in case.server.requests_for(case.big_file) if r.method == "GET"]
        assert len(gets) == 2
        assert "Range" not in gets[0].headers
        assert gets[1].headers["Range"] == "bytes=1000-" and gets[1].status == 206
        local = case.cfg.raw_dir(case.key) / case.relpath(case.big_file)
        served = case.server.local_path(case.big_file)
        assert local.read_bytes() == served.read_bytes()

    def test_failed_fetch_resumes_on_the_next_run(self, case: SourceCase) -> None:
        from ..errors import FetchError

        case.server.drop_after(case.big_file, nbytes=700, times=FAST_RETRIES.attempts)
        with pytest.raises(FetchError, match="failed after"):
            self._fetch(case)
        assert not case.cfg.raw_dir(case.key).exists()  # nothing that looks complete
        case.server.clear_log()
        self._fetch(case)
        gets = [r for r in case.server.requests_for(case.big_file) if r.method == "GET"]
        assert [g.headers.get("Range") for g in gets] == [f"bytes={700 * FAST_RETRIES.attempts}-"]
        local = case.cfg.raw_dir(case.key) / case.relpath(case.big_file)
        assert local.read_bytes() == case.server.local_path(case.big_file).read_bytes()

    def test_normalize_refuses_raw_data_of_other_params(self, case: SourceCase) -> None:
        from ..errors import NotBuiltError
        from ..normalize import normalize_dataset

        self._fetch(case)
        _pin_size(case, case.big_file, extra=1)  # params now describe another file
        with pytest.raises(NotBuiltError, match="fetched with other source params"):
            normalize_dataset(case.cfg, case.key)

    def test_503_with_retry_after_then_success(self, case: SourceCase) -> None:
        case.server.fail(case.big_file, status=503, times=2, retry_after=1)
        sleeps: list[float] = []
        self._fetch(case, sleeps)
        assert sleeps[:2] == [1.0, 1.0]
        assert [r.status for r in case.server.requests_for(case.big_file) if r.method == "GET"] == [503, 503, 200]

    @pytest.mark.parametrize("fault", ["truncate", "lie_length"])
    def test_wrong_size_raises_integrity_error_and_leaves_nothing(self, case: SourceCase, fault: str) -> None:
        if fault == "truncate":
            case.server.truncate(case.big_file, 500)
            # The truncated file is served consistently: only a pinned size can tell.
            _pin_size(case, case.big_file)
        else:
            case.server.lie_length(case.big_file, 77)
        with pytest.raises(IntegrityError) as err:
            self._fetch(case)
        assert case.key in str(err.value) and "127.0.0.1" in str(err.value)
        raw = case.cfg.raw_dir(case.key)
        assert not raw.exists()
        leftovers = list(case.cfg.partial_dir(case.key).glob(case.relpath(case.big_file) + "*"))
        assert leftovers == []

    def test_404_is_one_line_error_naming_dataset_and_url(self, case: SourceCase, tmp_path: Path) -> None:
        missing = case.server.local_path(case.big_file)
        missing.rename(tmp_path / "moved")
        proc = subprocess.run([sys.executable, "-m", "emdata", "fetch", case.key], cwd=case.cfg.root,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("emdata: error: ") and case.key in lines[0] and "404" in lines[0]
        assert case.server.url in lines[0]
        assert not case.cfg.raw_dir(case.key).exists()



def _pin_size(case: SourceCase, url_path: str, extra: int = 0) -> None:
    """Pin the real (untruncated) size of the file, plus ``extra``, in params.yaml."""
    import yaml

    served = case.server.local_path(url_path)
    params_path = case.cfg.root / "params.yaml"
    params: dict[str, Any] = yaml.safe_load(params_path.read_text())
    name = case.relpath(url_path)
    for spec in _file_specs(params["datasets"][case.key]["source"]):
        if spec.get("file") == name:
            spec["size"] = served.stat().st_size + extra
    params_path.write_text(yaml.safe_dump(params))
    case.cfg = case.reload()


def _file_specs(node: Any) -> list[dict[str, Any]]:
    """Every ``{file: ...}`` mapping inside a source section."""
    if isinstance(node, dict):
        found = [node] if "file" in node else []
        for value in node.values():
            found += _file_specs(value)
        return found
    if isinstance(node, list):
        return [spec for item in node for spec in _file_specs(item)]
    return []


def _edit_dataset(case: SourceCase, **changes: Any) -> None:
    """Set (or, with None, remove) top-level keys of the case's dataset in params.yaml, then reload."""
    import yaml

    params_path = case.cfg.root / "params.yaml"
    params: dict[str, Any] = yaml.safe_load(params_path.read_text())
    entry = params["datasets"][case.key]
    for key, value in changes.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    params_path.write_text(yaml.safe_dump(params))
    case.cfg = case.reload()
