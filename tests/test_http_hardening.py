"""Hardening of the HTTP layer: size limits, symlinks, redirects, errors, timeouts, full disks.

Everything runs against servers on 127.0.0.1: the project's ReplicaServer, and a small handler
of this file's own for what a well-behaved server never does (endless bodies, huge announced
lengths, redirects to other schemes, stalls). Each server-side loop is bounded in bytes and time.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest

from emdata.errors import ConfigError, FetchError, IntegrityError
from emdata.transport import sink
from emdata.transport.client import HttpClient
from emdata.transport.download import ResumableDownload, write_validator
from emdata.transport.retry import RetryPolicy
from emdata.testing.http_server import ReplicaServer

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, connect_timeout=2, read_timeout=5)
DATA = bytes(range(256)) * 397 + b"tail"  # 101,636 bytes, not a multiple of anything
SHA = hashlib.sha256(DATA).hexdigest()
PIN = 24_000  # "a file pinned at 24 KB"
SERVER_CAP = 8 << 20  # no handler of this file sends more than this in one response


@pytest.fixture(autouse=True)
def _no_env_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMDATA_READ_TIMEOUT", raising=False)


def client(sleeps: list | None = None, dataset: str = "ds") -> HttpClient:
    return HttpClient(dataset, policy=FAST, sleep=(sleeps.append if sleeps is not None else lambda s: None), seed=1)


def call(c: HttpClient, verb: str, url: str, tmp_path: Path) -> Any:
    """``download`` into tmp_path/f, or ``head`` / ``get_json``."""
    if verb == "download":
        return c.download(url, tmp_path / "f")
    return getattr(c, verb)(url)


def one_line(err: BaseException, limit: int = 300) -> str:
    text = str(err)
    assert "\n" not in text and len(text) <= limit, text
    return text


# -- a misbehaving server ------------------------------------------------------------------------

class _Rogue(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: ClassVar[dict[str, Callable[[_Rogue], None]]] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append((self.command, self.path, dict(self.headers.items())))  # type: ignore[attr-defined]
        try:
            self.routes[self.path.split("?")[0]](self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_HEAD = do_GET

    # pieces for the routes
    def head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.head(status, {**headers, "Content-Length": str(len(body))})
        self.wfile.write(body)

    def endless(self, chunked: bool) -> None:
        """Send up to SERVER_CAP bytes as one never-ending body (the client should stop first)."""
        block, sent = b"x" * 16384, 0
        while sent < SERVER_CAP:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        self.close_connection = True


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients here hang up mid-response on purpose


@pytest.fixture
def rogue():
    routes: dict[str, Callable[[_Rogue], None]] = {}
    handler = type("Handler", (_Rogue,), {"routes": routes})
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    httpd.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield url, routes, httpd.hits  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def srv(tmp_path: Path):
    with ReplicaServer(tmp_path / "www") as server:
        server.add_file("/d/file.bin", DATA)
        yield server


@pytest.fixture
def write_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of the written file after every os.write (any thread) during the test."""
    sizes: list[int] = []
    real = os.write

    def write(fd: int, data: Any) -> int:
        n = real(fd, data)
        try:
            sizes.append(os.fstat(fd).st_size)
        except OSError:
            pass
        return n

    monkeypatch.setattr(os, "write", write)
    return sizes


# -- 1. never more than the pinned or announced size ---------------------------------------------

def test_huge_content_length_fails_before_the_body(rogue, tmp_path, write_sizes) -> None:
    url, routes, _ = rogue

    def huge(h: _Rogue) -> None:
        h.head(200, {"Content-Length": str(10**12)})
        h.endless(chunked=False)

    routes["/big"] = huge
    with pytest.raises(IntegrityError) as err:
        client().download(url + "/big", tmp_path / "f", size=PIN)
    text = one_line(err.value)
    assert text.startswith("ds: ") and url + "/big" in text and str(10**12) in text and str(PIN) in text
    assert write_sizes == [] and list(tmp_path.iterdir()) == []  # refused before one body byte was written


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_endless_body_stops_at_the_pin(rogue, tmp_path, monkeypatch, write_sizes, chunked) -> None:
    url, routes, _ = rogue
    monkeypatch.setattr(sink, "RECV_BUFFER", 2 * sink.ALIGN)  # several writes before the pin

    def endless(h: _Rogue) -> None:
        h.head(200, {"Transfer-Encoding": "chunked"} if chunked else {"Connection": "close"})
        h.endless(chunked)

    routes["/endless"] = endless
    with pytest.raises(IntegrityError, match=f"more than {PIN} bytes") as err:
        client().download(url + "/endless", tmp_path / "f", size=PIN)
    assert url + "/endless" in one_line(err.value)
    assert write_sizes and max(write_sizes) <= PIN  # not one byte past the pin reached the disk
    assert list(tmp_path.iterdir()) == []


def test_content_range_total_must_match_the_pin(rogue, tmp_path, write_sizes) -> None:
    url, routes, _ = rogue

    def lying_range(h: _Rogue) -> None:
        h.head(206, {"Content-Range": f"bytes 1000-{10**12 - 1}/{10**12}", "Content-Length": str(10**12 - 1000)})
        h.endless(chunked=False)

    routes["/r"] = lying_range
    (tmp_path / "f.part").write_bytes(b"p" * 1000)  # an earlier run's bytes: the request is a resume
    write_validator(tmp_path / "f.part", url + "/r", '"v1"')
    with pytest.raises(IntegrityError, match="pins 24000") as err:
        client().download(url + "/r", tmp_path / "f", size=PIN)
    assert "ds: " in one_line(err.value)
    assert write_sizes == [] and list(tmp_path.iterdir()) == []


def test_unpinned_download_stops_at_the_announced_length(rogue, tmp_path) -> None:
    url, routes, _ = rogue

    def too_long(h: _Rogue) -> None:
        h.head(200, {"Content-Length": "1000", "Connection": "close"})
        h.wfile.write(DATA[:5000])  # more than announced
        h.close_connection = True

    routes["/x"] = too_long
    result = client().download(url + "/x", tmp_path / "f")
    assert result.size == 1000 and (tmp_path / "f").read_bytes() == DATA[:1000]
    assert result.sha256 == hashlib.sha256(DATA[:1000]).hexdigest()


def test_truncated_download_is_refused_before_reading(srv, tmp_path, write_sizes) -> None:
    srv.truncate("/d/file.bin", 500)  # consistent but short: only the pin can tell
    with pytest.raises(IntegrityError, match=f"pins {len(DATA)}"):
        client().download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA))
    assert write_sizes == [] and not (tmp_path / "f.part").exists()


# -- 2. symbolic links are never followed --------------------------------------------------------

def test_planted_part_symlink_is_refused_and_its_target_untouched(srv, tmp_path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "f.part").symlink_to(outside)
    with pytest.raises(FetchError, match="symbolic link") as err:
        client().download(srv.url + "/d/file.bin", tmp_path / "dl" / "f")
    assert "ds: " in one_line(err.value)
    assert outside.read_bytes() == b"precious" and srv.requests == []


def test_planted_dest_symlink_is_refused(srv, tmp_path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "f").symlink_to(outside)
    with pytest.raises(FetchError, match="symbolic link"):
        client().download(srv.url + "/d/file.bin", tmp_path / "dl" / "f")
    assert outside.read_bytes() == b"precious" and (tmp_path / "dl" / "f").is_symlink()


def test_symlink_planted_after_the_check_is_not_followed(srv, tmp_path, monkeypatch) -> None:
    """O_NOFOLLOW: a link that appears between the size check and the open is refused too."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    part = tmp_path / "f.part"
    real = ResumableDownload._part_size

    def racing(self: ResumableDownload) -> int:
        size, path = real(self), self.part
        if not path.is_symlink():
            path.unlink(missing_ok=True)
            path.symlink_to(outside)
        return size

    monkeypatch.setattr(ResumableDownload, "_part_size", racing)
    with pytest.raises(FetchError, match="symbolic link"):
        client().download(srv.url + "/d/file.bin", tmp_path / "f")
    assert outside.read_bytes() == b"precious" and part.is_symlink()


# -- 3. redirects and other request errors -------------------------------------------------------

@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x"])
@pytest.mark.parametrize("verb", ["download", "head", "get_json"])
def test_redirect_to_another_scheme_is_refused(rogue, tmp_path, target, verb) -> None:
    url, routes, hits = rogue
    routes["/go"] = lambda h: h.head(302, {"Location": target, "Content-Length": "0"})
    sleeps: list = []
    c = client(sleeps)
    with pytest.raises(FetchError) as err:
        call(c, verb, url + "/go", tmp_path)
    text = one_line(err.value)
    assert text.startswith(f"ds: {url}/go: redirected to a {target.split(':')[0]} URL")
    assert sleeps == [] and len(hits) == 1 and not (tmp_path / "f").exists()


@pytest.mark.parametrize("verb", ["download", "head", "get_json"])
def test_redirect_loop_is_one_line_error(rogue, tmp_path, verb) -> None:
    url, routes, hits = rogue
    routes["/loop"] = lambda h: h.head(302, {"Location": "/loop", "Content-Length": "0"})
    sleeps: list = []
    c = client(sleeps)
    with pytest.raises(FetchError, match="redirects") as err:
        call(c, verb, url + "/loop", tmp_path)
    assert url + "/loop" in one_line(err.value) and sleeps == []
    assert len(hits) <= 31


def test_redirect_to_http_is_followed_and_counted(rogue, srv, tmp_path) -> None:
    url, routes, _ = rogue
    routes["/go"] = lambda h: h.head(301, {"Location": srv.url + "/d/file.bin", "Content-Length": "0"})
    result = client().download(url + "/go", tmp_path / "f", size=len(DATA), sha256=SHA)
    assert result.path.read_bytes() == DATA and result.requests == 2


@pytest.mark.parametrize("bad", ["ftp://127.0.0.1/x", "127.0.0.1/no-scheme", "http://[::1/x", "http:///x"])
@pytest.mark.parametrize("verb", ["download", "head", "get_json"])
def test_bad_urls_are_fetch_errors(tmp_path, bad, verb) -> None:
    c = client()
    with pytest.raises(FetchError) as err:
        call(c, verb, bad, tmp_path)
    assert one_line(err.value).startswith(f"ds: {bad}: ")


def test_undecodable_body_is_a_fetch_error(rogue, tmp_path) -> None:
    url, routes, _ = rogue

    routes["/g"] = lambda h: h.reply(200, b"this is not gzip at all, whatever the header says",
                                     {"Content-Encoding": "gzip"})
    sleeps: list = []
    with pytest.raises(FetchError) as err:
        client(sleeps).get_json(url + "/g")
    assert url + "/g" in one_line(err.value)
    with pytest.raises(FetchError):
        client(sleeps).download(url + "/g", tmp_path / "f")
    assert sleeps == []


def test_gzip_body_is_decoded_by_the_fallback_reader(rogue, tmp_path) -> None:
    """A server that compresses although asked for identity: urllib3 decodes, sizes are checked."""
    url, routes, _ = rogue

    def gz(h: _Rogue) -> None:
        body = gzip.compress(DATA)
        h.head(200, {"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"})
        h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))

    routes["/z"] = gz
    result = client().download(url + "/z", tmp_path / "f", size=len(DATA), sha256=SHA)
    assert result.path.read_bytes() == DATA


def test_truncated_json_is_a_fetch_error(rogue) -> None:
    url, routes, _ = rogue

    routes["/j"] = lambda h: h.reply(200, b'{"files": [1, 2', {"Content-Type": "application/json"})
    with pytest.raises(FetchError, match="not JSON"):
        client().get_json(url + "/j")


# -- 4. short, fast network errors ---------------------------------------------------------------

@pytest.mark.parametrize("verb", ["download", "head", "get_json"])
def test_unresolvable_host_fails_fast_without_retries(tmp_path, verb) -> None:
    sleeps: list = []
    c = client(sleeps)
    url = "http://no-such-host.invalid/x.bin"
    with pytest.raises(FetchError) as err:
        call(c, verb, url, tmp_path)
    assert sleeps == [] and c.requests <= 1  # no retry, no back-off: a name that does not resolve stays so
    text = one_line(err.value, limit=200)
    assert "cannot resolve host no-such-host.invalid" in text and "check the URL in params.yaml or the network" in text
    assert sleeps == [] and c.requests == 1 and "resume" not in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.parametrize("verb", ["download", "head", "get_json"])
def test_connection_refused_is_retried_with_a_short_message(tmp_path, verb) -> None:
    sleeps: list = []
    c = client(sleeps)
    url = f"http://127.0.0.1:{free_port()}/x"
    with pytest.raises(FetchError, match="failed after 3 attempts") as err:
        call(c, verb, url, tmp_path)
    text = one_line(err.value, limit=200 + len("ds: ") + len(url))
    assert f"connection refused by {url.split('/')[2]}" in text and "Max retries" not in text
    assert len(sleeps) == 2
    assert ("run the same command again to resume" in text) == (verb == "download")


# -- 5. EMDATA_READ_TIMEOUT ----------------------------------------------------------------------

def test_read_timeout_comes_from_the_environment(monkeypatch) -> None:
    assert HttpClient("ds").policy.read_timeout == 60.0
    monkeypatch.setenv("EMDATA_READ_TIMEOUT", "2.5")
    assert HttpClient("ds").policy.read_timeout == 2.5
    assert RetryPolicy.from_env().read_timeout == 2.5 and RetryPolicy().read_timeout == 60.0
    assert HttpClient("ds", policy=FAST).policy.read_timeout == FAST.read_timeout  # explicit wins
    assert RetryPolicy.from_env({"EMDATA_READ_TIMEOUT": " 7 "}, attempts=2) == RetryPolicy(attempts=2, read_timeout=7.0)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "1s"])
def test_invalid_read_timeout_is_refused_at_client_creation(monkeypatch, value) -> None:
    monkeypatch.setenv("EMDATA_READ_TIMEOUT", value)
    with pytest.raises(ConfigError, match="EMDATA_READ_TIMEOUT") as err:
        HttpClient("ds")
    assert repr(value) in one_line(err.value)


def test_read_timeout_applies_to_a_stalled_body(rogue, tmp_path, monkeypatch) -> None:
    url, routes, _ = rogue
    release = threading.Event()

    def stall(h: _Rogue) -> None:
        h.head(200, {"Content-Length": str(len(DATA))})
        h.wfile.write(DATA[:5000])
        h.wfile.flush()
        release.wait(3)  # bounded: the client gives up long before
        h.close_connection = True

    routes["/s"] = stall
    monkeypatch.setenv("EMDATA_READ_TIMEOUT", "0.3")
    c = HttpClient("ds", policy=RetryPolicy.from_env(attempts=1), sleep=lambda s: None)
    try:
        with pytest.raises(FetchError, match=r"no data for 0\.3 s") as err:
            c.download(url + "/s", tmp_path / "f")  # the server's own 3 s wait would end in a short body instead
    finally:
        release.set()
    one_line(err.value, limit=250)
    assert (tmp_path / "f.part").read_bytes() == DATA[:5000]  # what arrived is kept for the resume


# -- 6. disk errors ------------------------------------------------------------------------------

def failing_write(monkeypatch, after: int, err: int = errno.ENOSPC, lie: bool = False) -> None:
    """os.write that writes ``after`` bytes in total, then fails (``lie``: writes, then fails)."""
    real, left = os.write, [after]

    def write(fd: int, data: Any) -> int:
        if left[0] <= 0:
            if lie:
                real(fd, data)  # the bytes land, yet the call reports a failure
            raise OSError(err, os.strerror(err))
        n = real(fd, memoryview(data)[:left[0]])
        left[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("lie", [False, True], ids=["clean", "bytes-landed"])
def test_disk_full_is_one_line_and_keeps_a_valid_prefix(srv, tmp_path, monkeypatch, lie) -> None:
    failing_write(monkeypatch, after=30_000, lie=lie)
    sleeps: list = []
    with pytest.raises(FetchError) as err:
        client(sleeps).download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA), sha256=SHA)
    text = one_line(err.value)
    assert text.startswith(f"ds: {srv.url}/d/file.bin: cannot write {tmp_path / 'f.part'}: disk full")
    assert sleeps == []  # no retry can help
    part = (tmp_path / "f.part").read_bytes()
    assert part == DATA[:30_000]
    monkeypatch.undo()
    srv.clear_log()
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA), sha256=SHA)
    assert result.path.read_bytes() == DATA and result.sha256 == SHA
    assert [r.headers.get("Range") for r in srv.requests] == ["bytes=30000-"]


def test_part_that_cannot_be_cut_back_is_removed(srv, tmp_path, monkeypatch) -> None:
    failing_write(monkeypatch, after=30_000, lie=True)
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(FetchError, match="disk full"):
        client().download(srv.url + "/d/file.bin", tmp_path / "f")
    assert not (tmp_path / "f.part").exists()


def test_other_write_errors_name_the_strerror(srv, tmp_path, monkeypatch) -> None:
    failing_write(monkeypatch, after=0, err=errno.EIO)
    with pytest.raises(FetchError, match=r"cannot write .*f\.part: Input/output error") as err:
        client().download(srv.url + "/d/file.bin", tmp_path / "f")
    one_line(err.value)


def test_failed_fsync_is_a_fetch_error(srv, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(FetchError, match="disk full") as err:
        client().download(srv.url + "/d/file.bin", tmp_path / "f")
    one_line(err.value)
    assert not (tmp_path / "f").exists()


# -- the fast path keeps every old promise ------------------------------------------------------

@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "page-cache"])
def test_small_buffers_drops_and_resumes_hash_correctly(srv, tmp_path, monkeypatch, direct) -> None:
    """Many buffers per file, cut connections, unaligned resumes: size and sha256 still right."""
    monkeypatch.setattr(sink, "RECV_BUFFER", 3 * sink.ALIGN)
    monkeypatch.setattr(sink, "DIRECT_IO", direct)
    monkeypatch.setattr(sink, "FLUSH_EVERY", 20_000)
    srv.drop_after("/d/file.bin", 7_777, times=2)
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA), sha256=SHA)
    assert result.path.read_bytes() == DATA and result.sha256 == SHA and result.requests == 3
    assert [r.headers.get("Range") for r in srv.requests] == [None, "bytes=7777-", "bytes=15554-"]


def served_validator(url: str) -> str:
    import requests

    return requests.head(url, timeout=5).headers["ETag"]


def test_resume_across_runs_hashes_the_earlier_prefix(srv, tmp_path) -> None:
    (tmp_path / "f.part").write_bytes(DATA[:50_001])
    write_validator(tmp_path / "f.part", srv.url + "/d/file.bin", served_validator(srv.url + "/d/file.bin"))
    srv.clear_log()
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f", sha256=SHA)
    assert result.sha256 == SHA and result.path.read_bytes() == DATA
    assert srv.requests[0].headers["Range"] == "bytes=50001-"


def test_complete_part_from_an_earlier_run_is_hashed_from_disk(srv, tmp_path) -> None:
    (tmp_path / "f.part").write_bytes(DATA)
    write_validator(tmp_path / "f.part", srv.url + "/d/file.bin", served_validator(srv.url + "/d/file.bin"))
    srv.clear_log()
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA), sha256=SHA)
    assert result.sha256 == SHA and srv.requests[0].status == 416


@pytest.mark.parametrize("where", ["fcntl", "write"])
def test_direct_io_refused_by_the_file_system_falls_back(srv, tmp_path, monkeypatch, where) -> None:
    import fcntl

    o_direct = getattr(os, "O_DIRECT", 0)
    real_write, real_fcntl = os.write, fcntl.fcntl

    def no_direct_write(fd: int, data: Any) -> int:
        if real_fcntl(fd, fcntl.F_GETFL) & o_direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    def no_direct_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & o_direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    if where == "write":
        monkeypatch.setattr(os, "write", no_direct_write)
    else:
        monkeypatch.setattr(fcntl, "fcntl", no_direct_fcntl)
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA), sha256=SHA)
    assert result.path.read_bytes() == DATA and result.sha256 == SHA


def test_chunked_body_goes_through_the_fallback_reader(rogue, tmp_path) -> None:
    url, routes, _ = rogue

    def chunked(h: _Rogue) -> None:
        h.head(200, {"Transfer-Encoding": "chunked"})
        for i in range(0, len(DATA), 10_000):
            piece = DATA[i:i + 10_000]
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")

    routes["/c"] = chunked
    result = client().download(url + "/c", tmp_path / "f", sha256=SHA)
    assert result.path.read_bytes() == DATA and result.size == len(DATA)
