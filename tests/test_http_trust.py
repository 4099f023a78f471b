"""Issue 20, the HTTP transport: resume never splices two versions, trickles fail in bounded time,
numbers from the wire and the environment are ASCII digits or an error, errors carry the HTTP status.

Everything runs against servers on 127.0.0.1 that this file starts; each server-side loop is
bounded in bytes and time. No assertion on wall-clock time: requests, attempts and bytes are counted.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import time
from typing import Any, Iterator

import pytest

from emdata.errors import ConfigError, FetchError, FormatError, IntegrityError
from emdata.sources.fetch.context import FetchContext, workers_from_env
from emdata.transport import headers
from emdata.transport.client import HttpClient
from emdata.transport.download import write_validator
from emdata.transport.retry import RetryPolicy
from emdata.core.numbers import ascii_decimal, ascii_int

SIZE = 50_021  # odd, several receive reads
OLD = bytes(range(251)) * (SIZE // 251) + bytes(SIZE % 251)
NEW = bytes(255 - b for b in OLD)  # same size, every byte differs
FAST = dict(attempts=3, base_delay=0.001, max_delay=0.002, connect_timeout=2, read_timeout=5)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EMDATA_READ_TIMEOUT", "EMDATA_MIN_RATE", "EMDATA_RATE_WINDOW", "EMDATA_FETCH_WORKERS"):
        monkeypatch.delenv(name, raising=False)


# -- a server whose one file has versions ----------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        f = self.server.file
        with f.lock:
            f.log.append((self.command, self.path, dict(self.headers.items())))
            data, etag, modified = f.data, f.etag, f.modified
            cut = f.cuts.pop(0) if body and f.cuts else None
            misplaced = f.misplaced > 0 and "Range" in self.headers
            f.misplaced -= misplaced
            trickle = f.trickles.pop(0) if body and f.trickles else None
        if self.path != "/file":
            status = f.statuses.get(self.path)
            if status is not None:  # (code, reason phrase)
                self.send_response(status[0], status[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(302)
            self.send_header("Location", f.locations.get(self.path, "/file"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        wanted = re.fullmatch(r"bytes=([0-9]+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        honour = if_range is None or not f.honour_if_range or if_range in (etag, modified)
        if wanted and honour:
            start = int(wanted.group(1))
        if misplaced:  # a 206 of the whole file, whatever was asked
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
            self.send_header("ETag", etag or "")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if start and not f.validators_on_206:
            etag = modified = None
        if etag:
            self.send_header("ETag", etag)
        if modified:
            self.send_header("Last-Modified", modified)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        rest = data[start:]
        try:
            if trickle is not None:  # (bytes per write, seconds between writes): bounded by the body
                step, pause = trickle
                for i in range(0, len(rest), step):
                    self.wfile.write(rest[i:i + step])
                    self.wfile.flush()
                    if f.release.wait(pause):
                        break
                self.close_connection = True
                return
            self.wfile.write(rest if cut is None else rest[:cut])
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True
                if f.on_cut is not None:
                    f.on_cut()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    file: Versioned

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up mid-body on purpose


class Versioned:
    """``/file`` with a version (bytes, ETag, Last-Modified); ``cuts``: close after N body bytes, once each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.cuts: list[int] = []
        self.trickles: list[tuple[int, float]] = []
        self.statuses: dict[str, tuple[int, str]] = {}
        self.locations: dict[str, str] = {}
        self.honour_if_range = True
        self.validators_on_206 = True  # False: a 206 names no version (no ETag, no Last-Modified)
        self.misplaced = 0  # answer this many Range requests with a 206 from byte 0
        self.on_cut: Any = None
        self.release = threading.Event()
        self.set(OLD, '"v1"', "Mon, 07 Dec 2026 10:00:00 GMT")
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.file = self
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def set(self, data: bytes, etag: str | None, modified: str | None) -> None:
        with self.lock:
            self.data, self.etag, self.modified = data, etag, modified

    def gets(self) -> list[dict[str, str]]:
        return [h for m, p, h in self.log if m == "GET" and p == "/file"]

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server() -> Iterator[Versioned]:
    s = Versioned()
    try:
        yield s
    finally:
        s.stop()


def client(**policy: Any) -> HttpClient:
    return HttpClient("ds", policy=RetryPolicy(**{**FAST, **policy}), sleep=lambda s: None, seed=1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- item 1: a resume never splices two versions ---------------------------------------------------

def test_file_changed_between_cut_and_resume_in_one_run_gives_the_new_file(server, tmp_path) -> None:
    server.cuts = [20_000]
    server.on_cut = lambda: server.set(NEW, '"v2"', "Tue, 08 Dec 2026 10:00:00 GMT")  # same size
    got = client().download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert (tmp_path / "f").read_bytes() == NEW and got.sha256 == sha(NEW)
    gets = server.gets()
    assert len(gets) == 2 and gets[1]["Range"] == "bytes=20000-" and gets[1]["If-Range"] == '"v1"'
    assert not (tmp_path / "f.part.validator").exists()


def test_file_changed_between_runs_gives_the_new_file(server, tmp_path) -> None:
    server.cuts = [30_000]
    with pytest.raises(FetchError, match="failed after 1 attempt"):
        client(attempts=1).download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert (tmp_path / "f.part").read_bytes() == OLD[:30_000]
    server.set(NEW, '"v2"', "Tue, 08 Dec 2026 10:00:00 GMT")  # the size is all params.yaml pins
    client().download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert (tmp_path / "f").read_bytes() == NEW
    assert [g.get("If-Range") for g in server.gets()] == [None, '"v1"']


def test_unchanged_file_is_resumed_not_fetched_again(server, tmp_path) -> None:
    server.cuts = [30_000]
    with pytest.raises(FetchError):
        client(attempts=1).download(server.url + "/file", tmp_path / "f")
    note = json.loads((tmp_path / "f.part.validator").read_text())
    assert note == {"url": server.url + "/file", "validator": '"v1"'}
    got = client().download(server.url + "/file", tmp_path / "f", sha256=sha(OLD))
    assert got.sha256 == sha(OLD) and server.gets()[-1]["Range"] == "bytes=30000-"


@pytest.mark.parametrize("validators_on_206", [True, False], ids=["another-validator", "no-validator"])
def test_server_ignoring_if_range_never_splices_two_versions(server, tmp_path, validators_on_206) -> None:
    """The server answers the Range of the new version: its 206 names that version, or none (which
    cannot prove it continues the partial file either): start over, never splice."""
    server.cuts = [30_000]
    with pytest.raises(FetchError):
        client(attempts=1).download(server.url + "/file", tmp_path / "f")
    server.honour_if_range, server.validators_on_206 = False, validators_on_206
    server.set(NEW, '"v2"', None)
    client().download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert (tmp_path / "f").read_bytes() == NEW
    assert [g.get("Range") for g in server.gets()] == [None, "bytes=30000-", None]


def test_206_starting_elsewhere_than_asked_is_refused_and_restarted(server, tmp_path) -> None:
    server.cuts = [30_000]
    server.misplaced = 1
    client().download(server.url + "/file", tmp_path / "f", size=SIZE, sha256=sha(OLD))
    assert (tmp_path / "f").read_bytes() == OLD
    assert [g.get("Range") for g in server.gets()] == [None, "bytes=30000-", None]


def test_part_without_validator_starts_over(server, tmp_path) -> None:
    """An older emdata's .part, or a server that sends no validator: restarted from byte 0."""
    (tmp_path / "f.part").write_bytes(OLD[:30_000])
    server.set(NEW, None, None)
    client().download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert (tmp_path / "f").read_bytes() == NEW
    assert [g.get("Range") for g in server.gets()] == [None]


def test_server_without_validators_restarts_instead_of_resuming(server, tmp_path) -> None:
    server.set(OLD, None, None)
    server.cuts = [20_000]
    client().download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert (tmp_path / "f").read_bytes() == OLD
    assert [g.get("Range") for g in server.gets()] == [None, None]


def test_weak_etag_falls_back_to_last_modified(server, tmp_path) -> None:
    server.set(OLD, 'W/"weak"', "Mon, 07 Dec 2026 10:00:00 GMT")
    server.cuts = [20_000]
    client().download(server.url + "/file", tmp_path / "f", size=SIZE, sha256=sha(OLD))
    assert server.gets()[1]["If-Range"] == "Mon, 07 Dec 2026 10:00:00 GMT"


def test_validator_of_another_url_is_not_trusted(server, tmp_path) -> None:
    (tmp_path / "f.part").write_bytes(OLD[:30_000])
    write_validator(tmp_path / "f.part", server.url + "/elsewhere", '"v1"')
    client().download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert [g.get("Range") for g in server.gets()] == [None]


def test_integrity_error_removes_the_part_and_its_validator(server, tmp_path) -> None:
    with pytest.raises(IntegrityError):
        client().download(server.url + "/file", tmp_path / "f", sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- item 8: a minimum transfer rate --------------------------------------------------------------

def trickling_policy(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> RetryPolicy:
    """Through the environment, as a user sets it: 100 kB/s over 0.2 s windows."""
    monkeypatch.setenv("EMDATA_MIN_RATE", "100000")
    monkeypatch.setenv("EMDATA_RATE_WINDOW", "0.2")
    return RetryPolicy.from_env(**{**FAST, **fields})


def test_trickling_server_fails_the_download_after_its_attempts(server, tmp_path, monkeypatch) -> None:
    server.trickles = [(10, 0.01)] * 3  # about 1 kB/s; the whole body would take 50 s
    c = HttpClient("ds", policy=trickling_policy(monkeypatch), sleep=lambda s: None)
    with pytest.raises(FetchError, match="failed after 3 attempts .*stalled") as err:
        c.download(server.url + "/file", tmp_path / "f", size=SIZE)
    assert "\n" not in str(err.value) and "EMDATA_MIN_RATE" in str(err.value)
    ranges = [g.get("Range") for g in server.gets()]
    assert len(ranges) == 3 and ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
    have = (tmp_path / "f.part").stat().st_size
    assert 0 < have < SIZE // 5  # what trickled in is kept for the next run


def test_stalled_transfer_resumes_and_completes(server, tmp_path, monkeypatch) -> None:
    server.trickles = [(10, 0.01)]  # the first answer trickles, the second is fast
    c = HttpClient("ds", policy=trickling_policy(monkeypatch), sleep=lambda s: None)
    got = c.download(server.url + "/file", tmp_path / "f", size=SIZE, sha256=sha(OLD))
    assert got.sha256 == sha(OLD) and got.requests == 2
    first = server.gets()[1]["Range"]
    assert first != "bytes=0-" and int(first[6:-1]) > 0  # resumed from what had trickled in


def test_trickling_api_answer_fails_too(server, tmp_path, monkeypatch) -> None:
    server.trickles = [(10, 0.01)] * 3
    c = HttpClient("ds", policy=trickling_policy(monkeypatch), sleep=lambda s: None)
    with pytest.raises(FetchError, match="stalled"):
        c.get_bytes(server.url + "/file")
    assert len(server.gets()) == 3


def test_default_minimum_rate_bounds_a_trickle_under_90_seconds() -> None:
    """Each attempt of a trickle ends after one window; the waits between attempts are bounded."""
    p = RetryPolicy()
    assert p.min_rate > 1 and p.rate_window > 0
    waits = sum(min(p.max_delay, p.base_delay * 2 ** a) for a in range(p.attempts - 1))
    assert p.attempts * (p.rate_window + 1.0) + waits < 90  # +1 s: the check runs once a read returns


def test_rate_settings_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("EMDATA_MIN_RATE", "0")
    monkeypatch.setenv("EMDATA_RATE_WINDOW", " 2.5 ")
    p = RetryPolicy.from_env()
    assert p.min_rate == 0 and p.rate_window == 2.5
    assert RetryPolicy.from_env({}) == RetryPolicy()


@pytest.mark.parametrize("name", ["EMDATA_MIN_RATE", "EMDATA_RATE_WINDOW", "EMDATA_READ_TIMEOUT"])
@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", "1_0", "١٢", "²", "1e3"])
def test_invalid_rate_settings_are_one_config_error(monkeypatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name) as err:
        HttpClient("ds")
    assert "\n" not in str(err.value)


def test_zero_window_or_timeout_is_refused(monkeypatch) -> None:
    for name in ("EMDATA_RATE_WINDOW", "EMDATA_READ_TIMEOUT"):
        with pytest.raises(ConfigError, match=name):
            RetryPolicy.from_env({name: "0"})


# -- item 11: numbers are ASCII digits or nothing --------------------------------------------------

@pytest.mark.parametrize("text, number", [("12", 12), (" 7\t", 7), ("0", 0), ("²", None), ("١٢", None),
                                          ("1_0", None), ("-1", None), ("+1", None), ("", None),
                                          ("9" * 31, None), (None, None), (12, None)])
def test_ascii_int(text, number) -> None:
    assert ascii_int(text) == number


@pytest.mark.parametrize("text, number", [("2.5", 2.5), ("60", 60.0), (".5", 0.5), ("1.", 1.0), ("²", None),
                                          ("١.٥", None), ("1e3", None), ("nan", None), ("inf", None)])
def test_ascii_decimal(text, number) -> None:
    assert ascii_decimal(text) == number


def test_non_ascii_numbers_on_the_wire_are_ignored_not_a_crash() -> None:
    assert headers.parse_retry_after("²") is None and headers.parse_retry_after("١٢") is None
    assert headers.parse_retry_after(" 3 ") == 3.0
    assert headers.content_range("bytes ²-9/10") is None and headers.content_range("bytes 0-9/١٠") is None
    assert headers.content_range("bytes 5-9/10") == (5, 10)

    class R:
        headers = {"Content-Length": "²"}

    assert headers.content_length(R()) is None  # type: ignore[arg-type]


def test_non_ascii_content_length_from_a_server_is_no_crash(server, tmp_path) -> None:
    class Odd(_Handler):
        def _serve(self, body: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "²")
            self.send_header("Retry-After", "²")
            self.send_header("Connection", "close")
            self.end_headers()
            if body:
                self.wfile.write(b"abc")

    httpd = _Server(("127.0.0.1", 0), Odd)
    httpd.file = server
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/x"
        try:
            info = client(attempts=1).head(url)
        except FetchError:
            pass  # the HTTP library may refuse the header itself: one line either way
        else:
            assert info.size is None
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("value", ["²", "١٢", "0", "65", "4x"])
def test_fetch_workers_env_is_ascii_digits(monkeypatch, value) -> None:
    monkeypatch.setenv("EMDATA_FETCH_WORKERS", value)
    with pytest.raises(ConfigError, match="EMDATA_FETCH_WORKERS"):
        workers_from_env()


def test_fetch_workers_env_accepts_a_plain_number(monkeypatch) -> None:
    monkeypatch.setenv("EMDATA_FETCH_WORKERS", "8")
    assert workers_from_env() == 8


def test_readers_parse_ascii_digits_only() -> None:
    from emdata.formats.dm3 import natural_sorted
    from emdata.sources.empiar import image_count

    assert natural_sorted(["s_10.dm3", "²", "s_2.dm3", "s_1²"]) == ["s_1²", "s_2.dm3", "s_10.dm3", "²"]
    with pytest.raises(FormatError, match="not a count"):
        image_count({"num_images_or_tilt_series": "²"}, "ds", "api")
    assert image_count({"num_images_or_tilt_series": "12"}, "ds", "api") == 12


def test_ome_xml_size_in_non_ascii_digits_is_a_format_error(tmp_path) -> None:
    from emdata.formats.ometiff import parse_ome_xml

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" SizeX="²" SizeY="3" '
           'SizeZ="1" SizeC="1" SizeT="1"><TiffData/></Pixels></Image></OME>')
    with pytest.raises(FormatError, match="SizeX='²' is not a positive integer"):
        parse_ome_xml(xml, "ds", tmp_path / "a.ome.tif")


def test_redirect_to_an_invalid_ipv6_url_is_one_line(server, tmp_path) -> None:
    server.locations["/go"] = "http://[::1/x"
    for verb in ("download", "head", "get_bytes"):
        with pytest.raises(FetchError, match="redirected to an invalid URL") as err:
            c = client()
            if verb == "download":
                c.download(server.url + "/go", tmp_path / "f")
            else:
                getattr(c, verb)(server.url + "/go")
        assert "\n" not in str(err.value) and "datasets.ds.source" in str(err.value)


def test_redirect_to_a_location_that_is_not_utf8_is_one_line(server, tmp_path) -> None:
    server.locations["/go"] = server.url + "/caf\u00e9"  # sent as Latin-1: byte 0xe9
    for verb in ("download", "head", "get_bytes"):
        with pytest.raises(FetchError, match="not valid UTF-8") as err:
            c = client()
            if verb == "download":
                c.download(server.url + "/go", tmp_path / "f")
            else:
                getattr(c, verb)(server.url + "/go")
        assert "\n" not in str(err.value) and err.value.dataset == "ds"


def test_base_url_with_an_invalid_ipv6_host_is_a_config_error() -> None:
    from emdata.params.schema import as_url

    with pytest.raises(ConfigError, match="invalid URL") as err:
        as_url("http://[::1/data/", "datasets.x.source.base_url")
    assert "datasets.x.source.base_url" in str(err.value)


# -- item 15: errors carry the HTTP status ---------------------------------------------------------

def test_fetch_errors_carry_the_status(server) -> None:
    server.statuses["/gone"] = (404, "Not Found")
    server.statuses["/busy"] = (503, "Busy")
    with pytest.raises(FetchError) as err:
        client().get_bytes(server.url + "/gone")
    assert err.value.status == 404
    with pytest.raises(FetchError, match="failed after 3 attempts") as err:
        client().get_bytes(server.url + "/busy")
    assert err.value.status == 503
    assert client().probe(server.url + "/gone") is None


def test_probe_reads_the_status_not_the_message(server) -> None:
    """A 403 whose reason phrase says "HTTP 404" is not a missing file."""
    server.statuses["/odd"] = (403, "HTTP 404 pretending")
    with pytest.raises(FetchError) as err:
        client().probe(server.url + "/odd")
    assert err.value.status == 403


def test_transport_errors_have_no_status(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError) as err:
        client(attempts=1).head(f"http://127.0.0.1:{port}/x")
    assert err.value.status is None


# -- item 16: messages name the key, shared state is thread-safe -----------------------------------

def test_messages_name_the_dataset_key(server) -> None:
    server.statuses["/gone"] = (404, "Not Found")
    with pytest.raises(FetchError) as err:
        HttpClient("my_ds", policy=RetryPolicy(**FAST), sleep=lambda s: None).get_bytes(server.url + "/gone")
    assert "datasets.my_ds.source" in str(err.value) and "<name>" not in str(err.value)


def test_one_http_client_per_context_under_concurrent_first_use(tmp_path) -> None:
    built: list[HttpClient] = []

    def factory() -> HttpClient:
        time.sleep(0.05)  # widen the window in which a second thread could build another
        built.append(client())
        return built[-1]

    ctx = FetchContext("ds", "epfl", {}, tmp_path, http_factory=factory, workers=8)
    got = ctx.map(lambda i: ctx.http, range(8))
    assert len(built) == 1 and all(c is built[0] for c in got)


def test_request_count_is_exact_across_threads(server, tmp_path) -> None:
    c = client()
    ctx = FetchContext("ds", "epfl", {}, tmp_path, http_factory=lambda: c, workers=8)
    ctx.map(lambda i: ctx.http.head(server.url + "/file"), range(64))
    assert c.requests == 64 and ctx.requests == 64


def test_download_counts_its_own_requests_while_others_run(server, tmp_path) -> None:
    c = client()
    ctx = FetchContext("ds", "epfl", {}, tmp_path, http_factory=lambda: c, workers=4)
    results = ctx.map(lambda i: c.download(server.url + "/file", tmp_path / f"f{i}"), range(4))
    assert [r.requests for r in results] == [1, 1, 1, 1] and c.requests == 4


def test_plan_says_new_for_a_part_that_fetch_will_restart(tmp_path) -> None:
    from emdata.sources.fetch.files import RemoteFile, plan_files

    ctx = FetchContext("ds", "epfl", {}, tmp_path)
    spec = RemoteFile("f.bin", "http://127.0.0.1:9/f.bin", SIZE, None)
    (tmp_path / "f.bin.part").write_bytes(OLD[:1000])
    assert (plan_files(ctx, [spec])[0].state, plan_files(ctx, [spec])[0].to_transfer) == ("new", SIZE)
    write_validator(tmp_path / "f.bin.part", spec.url, '"v1"')
    assert (plan_files(ctx, [spec])[0].state, plan_files(ctx, [spec])[0].to_transfer) == ("resume", SIZE - 1000)


# -- response headers trickled a byte at a time: bounded as a whole ---------------------------------

class _HeaderTrickle(http.server.BaseHTTPRequestHandler):
    """A status line, then header bytes every 0.1 s (each read is quick, the headers never end)."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner  # type: ignore[attr-defined]
        owner.requests += 1
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Slow: ")
        for _ in range(100):  # bounded: 10 s at most, far beyond the client's deadline
            try:
                self.wfile.write(b"a")
                self.wfile.flush()
            except OSError:
                owner.hung_up += 1  # the client gave up on the headers
                return
            if owner.release.wait(0.1):
                return


def test_headers_trickled_forever_fail_each_attempt_at_the_read_timeout(tmp_path) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeaderTrickle)
    httpd.daemon_threads = True
    httpd.owner = type("Owner", (), {"requests": 0, "hung_up": 0, "release": threading.Event()})()  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        c = client(attempts=2, read_timeout=0.5)  # each read would come in time: 0.1 s < 0.5 s
        with pytest.raises(FetchError, match="read timeout|no data") as err:
            c.download(f"http://127.0.0.1:{httpd.server_address[1]}/f", tmp_path / "f")
        assert "\n" not in str(err.value)
        owner = httpd.owner  # type: ignore[attr-defined]
        assert owner.requests == 2  # both attempts were cut at the deadline, then the download gave up
        for _ in range(50):  # the server notices the closed socket at its next write (0.1 s)
            if owner.hung_up == 2:
                break
            owner.release.wait(0.1)
        assert owner.hung_up == 2
    finally:
        httpd.owner.release.set()  # type: ignore[attr-defined]
        httpd.shutdown()
        httpd.server_close()
