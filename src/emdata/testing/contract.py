"""The contract every source kind passes against its registered replica (like bioio's conformance).

Layers: :class:`CoreContract` holds what every source must do whatever its transport (exact
round trip of an odd-shaped, coordinate-encoded volume; a second fetch is a no-op; JSON-safe
native metadata; geometry reported by the source or overridden by params). Transport mixins add
the failure behaviour of one protocol: :class:`HttpContract` (drops, 503 + Retry-After,
truncation, wrong length, 404), :class:`ArrayHttpContract` (chunked arrays read over HTTP through
a library such as tensorstore: retried chunks, one-line failures, resume by block),
:class:`S3Contract` (for S3 sources) and :class:`LocalContract` (imports of the user's own
files). ``tests/test_contract.py`` runs them for every kind in :mod:`emdata.testing.registry`,
with no per-kind code.

Collections (``LAYOUT = "collection"``, :mod:`emdata.h5.collection`) run the same tests: their
expected arrays are keyed by HDF5 path (``images/<id>/...``), each array's recorded pixel size is
checked against ``resolutions``, and the geometry override is checked on the first item. A
download that does not land in the raw folder as it was served (an archive that is unpacked)
must be recorded whole in the fetch record (``extra["sources"]``: url, size, sha256).
"""

from __future__ import annotations

import json
import re
import subprocess
import hashlib
import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from emdata.errors import FetchError, FormatError, IntegrityError, NotBuiltError, SourceError
from emdata.params.config import Config
from emdata.sources.dataset import resolve_dataset
from emdata.sources.fetch.record import FetchRecord
from emdata.stages.fetch import fetch_dataset
from emdata.stages.normalize.collection import item_geometry
from emdata.stages.normalize.volume import dataset_geometry, normalize_dataset
from emdata.transport.client import HttpClient
from emdata.transport.retry import RetryPolicy

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
    pin_size: Callable[[dict[str, Any], str, int], None] | None = None  # ReplicaCase.pin_size
    resolutions: dict[str, tuple[float, ...]] = field(default_factory=dict)  # collection array -> resolution

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

    # The tests take a ``case`` fixture (a :class:`SourceCase`) that the test module provides.

    def _fetch(self, case: SourceCase, sleeps: list[float] | None = None, policy: RetryPolicy = FAST_RETRIES):
        return fetch_dataset(case.cfg, case.key, http_factory=lambda: client_for(case, sleeps), policy=policy)

    def _normalize(self, case: SourceCase) -> Path:
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

    def test_labels_lie_on_the_image_grid_with_their_ids(self, case: SourceCase) -> None:
        """Every expected label is stored under /labels with the source's dtype (ids as they are, uint64
        body ids too), the image's shape, resolution and offset, and exact statistics: the object count
        and background fraction for instance labels (wider than 16 bits), never a histogram of ids."""
        import h5py

        labels = {name: array for name, array in case.expected.items() if name.startswith("labels/")}
        if not labels or _is_collection(case):
            pytest.skip("no volume labels in this case")
        self._fetch(case)
        with h5py.File(self._normalize(case), "r") as f:
            raw = f["raw"]
            for name, array in labels.items():
                got = f[name]
                assert got.dtype == array.dtype.newbyteorder("<") or got.dtype == array.dtype, name
                assert got.shape == raw.shape, name
                for attr in ("resolution", "offset"):
                    np.testing.assert_array_equal(got.attrs[attr], raw.attrs[attr], err_msg=f"{name} {attr}")
                stats = json.loads(got.attrs["statistics"])
                assert stats["count"] == array.size and stats["zero_fraction"] == np.mean(array == 0), name
                if array.dtype.kind in "iu" and array.dtype.itemsize > 2:
                    ids = np.unique(array[array != 0])
                    assert stats["object_count"] == ids.size, name
                    assert stats["background_fraction"] == stats["zero_fraction"], name
                    assert stats["max"] == (int(ids[-1]) if ids.size else 0), name
                    assert "hist" not in stats and stats["percentiles"] is None, name

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
            if _is_collection(case):
                for name in case.expected:
                    if f[name].dtype.names:  # a table, not an image
                        continue
                    want = case.resolutions.get(name, case.voxel_size_nm[-len(f[name].attrs["resolution"]):])
                    np.testing.assert_allclose(f[name].attrs["resolution"], want, err_msg=name)
                    np.testing.assert_allclose(f[name].attrs["offset"], 0.0, err_msg=name)
            else:
                np.testing.assert_allclose(f["raw"].attrs["resolution"], case.voxel_size_nm)
                np.testing.assert_allclose(f["raw"].attrs["offset"], case.offset_nm)
            origin = json.loads(f.attrs["geometry_origin"])
            assert set(origin) == {"voxel_size_nm", "offset_nm"}
        # An override in params that disagrees by more than 1 % is refused unless params say whom to trust.
        reported = self._reported_voxel_size(case)
        if reported is None:  # the format carries none: params must give it (tested in test_geometry)
            return
        wrong = [v * 1.5 for v in reported]
        _edit_dataset(case, voxel_size_nm=[1.0] * (3 - len(wrong)) + wrong, geometry_trust=None)
        with pytest.raises(FormatError, match="params.yaml says"):
            _resolved_voxel_size(case)
        _edit_dataset(case, geometry_trust="params")
        assert list(_resolved_voxel_size(case)) == wrong

    def _reported_voxel_size(self, case: SourceCase) -> tuple[float, ...] | None:
        """A volume's voxel size, or a collection's first item's pixel size (per spatial axis)."""
        ds = resolve_dataset(case.cfg, case.key)
        if ds.layout == "collection":
            with ds.module.open_collection(ds.source, ds.paths.raw, case.key) as coll:
                return coll.items[0].pixel_size_nm
        with ds.module.open_volume(ds.source, ds.paths.raw, case.key) as volume:
            return volume.voxel_size_nm

    def test_metadata_is_json_serializable(self, case: SourceCase) -> None:
        self._fetch(case)
        ds = resolve_dataset(case.cfg, case.key)
        native = ds.module.read_metadata(ds.source, ds.paths.raw, case.key)
        assert json.loads(json.dumps(native)) == native
        assert native


def _is_collection(case: SourceCase) -> bool:
    return resolve_dataset(case.cfg, case.key).layout == "collection"


def _resolved_voxel_size(case: SourceCase) -> tuple[float, ...]:
    """What normalize would record for the volume (or the collection's first item) under params now."""
    ds = resolve_dataset(case.cfg, case.key)
    if ds.layout == "collection":
        with ds.module.open_collection(ds.source, ds.paths.raw, case.key) as coll:
            return item_geometry(ds, coll.items[0]).voxel_size_nm
    with ds.module.open_volume(ds.source, ds.paths.raw, case.key) as volume:
        return dataset_geometry(ds, volume).voxel_size_nm


def _assert_landed(case: SourceCase, url_path: str) -> None:
    """The served file is in the raw folder byte for byte, or (an unpacked archive) recorded whole."""
    served = case.server.local_path(url_path).read_bytes()
    local = case.cfg.raw_dir(case.key) / case.relpath(url_path)
    if local.is_file():
        assert local.read_bytes() == served
        return
    record = FetchRecord.load(case.cfg.raw_dir(case.key))
    assert record is not None
    digest = hashlib.sha256(served).hexdigest()
    whole = [s for s in record.extra.get("sources", []) if s.get("sha256") == digest]
    assert whole and whole[0]["size"] == len(served), f"{url_path} is neither in the raw folder nor recorded whole"


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


class ArrayHttpContract:
    """Failure behaviour of sources that read a chunked array over HTTP(S) and store decoded blocks.

    A library (tensorstore) sends one request per chunk or shard and retries it; the source writes
    what it decodes into a local chunked store, block by block. ``big_file`` is an object that
    some blocks of the case read and others do not (the replica chooses it), so a failure there
    leaves finished blocks behind, which the next run keeps.
    """

    case: Callable[..., SourceCase]
    _fetch: Callable[..., Any]
    _normalize: Callable[..., Path]

    def _assert_round_trip(self, case: SourceCase) -> None:
        import h5py

        with h5py.File(self._normalize(case), "r") as f:
            np.testing.assert_array_equal(f["raw"][()], case.expected["raw"])

    def test_503_then_success(self, case: SourceCase) -> None:
        case.server.fail(case.big_file, status=503, times=2, retry_after=1)
        self._fetch(case)
        statuses = [r.status for r in case.server.requests_for(case.big_file) if r.method == "GET"]
        assert statuses[:2] == [503, 503] and set(statuses[2:]) <= {200, 206} and statuses[2:]
        self._assert_round_trip(case)

    def test_dropped_connection_is_retried(self, case: SourceCase) -> None:
        case.server.drop_after(case.big_file, nbytes=10, times=1)
        self._fetch(case)
        assert len([r for r in case.server.requests_for(case.big_file) if r.method == "GET"]) >= 2
        self._assert_round_trip(case)

    def test_failure_is_one_error_and_the_next_run_resumes_by_block(self, case: SourceCase) -> None:
        case.server.fail(case.big_file, status=503, times=10**6)
        with pytest.raises(FetchError) as err:
            self._fetch(case)
        message = str(err.value)
        assert message.startswith(f"{case.key}: ") and urllib.parse.unquote(case.big_file) in message
        assert "\n" not in message and "503" in message, message
        assert not case.cfg.raw_dir(case.key).exists()  # nothing that looks complete
        partial = case.cfg.partial_dir(case.key)
        kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in partial.rglob("*")
                if p.is_file() and not p.name.startswith(".")}
        assert kept, "no block was finished before the failure"
        case.server.faults.fail.clear()
        case.server.clear_log()
        self._fetch(case)
        raw = case.cfg.raw_dir(case.key)
        for path, stamp in kept.items():  # finished blocks are neither fetched nor written again
            moved = raw / path.relative_to(partial)
            assert (moved.stat().st_ino, moved.stat().st_mtime_ns) == stamp, moved
        self._assert_round_trip(case)

    @pytest.mark.parametrize("fault", ["truncate", "lie_length"])
    def test_damaged_object_is_an_error_and_leaves_nothing(self, case: SourceCase, fault: str) -> None:
        if fault == "truncate":
            case.server.truncate(case.big_file, 40)  # served consistently: only decoding can tell
        else:
            case.server.lie_length(case.big_file, 77)
        with pytest.raises(SourceError) as err:
            self._fetch(case)
        assert str(err.value).startswith(f"{case.key}: ") and "127.0.0.1" in str(err.value)
        assert not case.cfg.raw_dir(case.key).exists()


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
        _assert_landed(case, case.big_file)

    def test_failed_fetch_resumes_on_the_next_run(self, case: SourceCase) -> None:
        case.server.drop_after(case.big_file, nbytes=700, times=FAST_RETRIES.attempts)
        with pytest.raises(FetchError, match="failed after"):
            self._fetch(case)
        assert not case.cfg.raw_dir(case.key).exists()  # nothing that looks complete
        case.server.clear_log()
        self._fetch(case)
        gets = [r for r in case.server.requests_for(case.big_file) if r.method == "GET"]
        assert [g.headers.get("Range") for g in gets] == [f"bytes={700 * FAST_RETRIES.attempts}-"]
        _assert_landed(case, case.big_file)

    def test_normalize_refuses_raw_data_of_other_params(self, case: SourceCase) -> None:
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



class LocalContract:
    """Imports of files the user has (a folder or a zip given by path): ``fault_path`` is one of them."""

    case: Callable[..., SourceCase]
    _fetch: Callable[..., Any]

    def test_a_missing_path_is_one_line_naming_dataset_and_path(self, case: SourceCase, tmp_path: Path) -> None:
        source = Path(resolve_dataset(case.cfg, case.key).source.path)
        source.rename(tmp_path / "moved")
        try:
            proc = subprocess.run([sys.executable, "-m", "emdata", "fetch", case.key], cwd=case.cfg.root,
                                  capture_output=True, text=True, timeout=120)
        finally:
            (tmp_path / "moved").rename(source)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("emdata: error: ") and case.key in lines[0] and str(source) in lines[0]
        assert not case.cfg.raw_dir(case.key).exists()

    def test_changed_files_are_imported_again(self, case: SourceCase) -> None:
        self._fetch(case)
        assert self._fetch(case).up_to_date
        path = Path(case.big_file)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched, e.g. copied again
        again = self._fetch(case)
        assert not again.up_to_date
        assert self._fetch(case).up_to_date

    def test_a_damaged_file_leaves_the_last_import_untouched(self, case: SourceCase) -> None:
        self._fetch(case)
        raw = case.cfg.raw_dir(case.key)
        before = {p: p.read_bytes() for p in sorted(raw.rglob("*")) if p.is_file()}
        path = Path(case.big_file)
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 3])  # a TIF (or zip) cut short
        try:
            with pytest.raises(FormatError):
                self._fetch(case)
        finally:
            path.write_bytes(original)
        assert {p: p.read_bytes() for p in sorted(raw.rglob("*")) if p.is_file()} == before


def _pin_size(case: SourceCase, url_path: str, extra: int = 0) -> None:
    """Pin the real (untruncated) size of the file, plus ``extra``, in params.yaml."""
    import yaml

    served = case.server.local_path(url_path)
    params_path = case.cfg.root / "params.yaml"
    params: dict[str, Any] = yaml.safe_load(params_path.read_text())
    name = case.relpath(url_path)
    entry = params["datasets"][case.key]
    specs = [spec for spec in _file_specs(entry["source"]) if spec.get("file") == name]
    for spec in specs:
        spec["size"] = served.stat().st_size + extra
    if not specs:  # no {file: ...} spec names it: the replica says how this source pins a size
        assert case.pin_size is not None, f"{case.key}: params name no {name!r} and the replica has no pin_size"
        case.pin_size(entry, name, served.stat().st_size + extra)
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
