"""The HTTP transfer layer on its own: resume, retries, verification, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from emdata.errors import FetchError, IntegrityError
from emdata.transport.client import HttpClient
from emdata.transport.download import write_validator
from emdata.transport.headers import parse_retry_after
from emdata.transport.retry import RetryPolicy
from emdata.testing.http_server import ReplicaServer

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, connect_timeout=2, read_timeout=5)
DATA = bytes(range(256)) * 397 + b"tail"  # 101,636 bytes, not a multiple of anything


@pytest.fixture
def srv(tmp_path: Path):
    with ReplicaServer(tmp_path / "www") as server:
        server.add_file("/d/file.bin", DATA)
        yield server


def client(sleeps: list | None = None) -> HttpClient:
    return HttpClient("ds", policy=FAST, sleep=(sleeps.append if sleeps is not None else lambda s: None), seed=1)


def test_download_verifies_size_and_sha(srv, tmp_path) -> None:
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f", size=len(DATA),
                               sha256=hashlib.sha256(DATA).hexdigest())
    assert result.path.read_bytes() == DATA and result.requests == 1
    assert not (tmp_path / "f.part").exists()


def test_wrong_pinned_sha_raises_and_removes_the_part(srv, tmp_path) -> None:
    with pytest.raises(IntegrityError, match="sha256"):
        client().download(srv.url + "/d/file.bin", tmp_path / "f", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == [tmp_path / "www"]


def test_exhausted_retries_keep_the_part_and_a_later_run_resumes(srv, tmp_path) -> None:
    srv.drop_after("/d/file.bin", 4000, times=3)  # every attempt of the first run is cut
    with pytest.raises(FetchError, match="failed after 3 attempts") as err:
        client().download(srv.url + "/d/file.bin", tmp_path / "f")
    assert "ds:" in str(err.value) and "/d/file.bin" in str(err.value)
    assert (tmp_path / "f.part").stat().st_size == 12000  # three attempts, each resumed
    srv.clear_log()
    client().download(srv.url + "/d/file.bin", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == DATA
    assert [r.headers.get("Range") for r in srv.requests] == ["bytes=12000-"]


def test_server_ignoring_range_restarts_from_zero(srv, tmp_path) -> None:
    (tmp_path / "f.part").write_bytes(b"stale bytes from an older run")
    write_validator(tmp_path / "f.part", srv.url + "/d/file.bin", '"v1"')  # else it is not resumed at all
    srv.ignore_range("/d/file.bin")
    result = client().download(srv.url + "/d/file.bin", tmp_path / "f")
    assert result.path.read_bytes() == DATA
    assert srv.requests[0].headers["Range"].startswith("bytes=") and srv.requests[0].status == 200


def test_404_is_not_retried(srv, tmp_path) -> None:
    sleeps: list = []
    with pytest.raises(FetchError, match="HTTP 404") as err:
        client(sleeps).download(srv.url + "/d/missing.bin", tmp_path / "f")
    assert sleeps == [] and len(srv.requests) == 1
    assert "/d/missing.bin" in str(err.value)


def test_429_and_500_are_retried_with_backoff(srv, tmp_path) -> None:
    sleeps: list = []
    srv.fail("/d/file.bin", status=500, times=2)
    client(sleeps).download(srv.url + "/d/file.bin", tmp_path / "f")
    assert len(sleeps) == 2 and all(0 < s <= FAST.max_delay for s in sleeps)


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: no wait
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retry_after_is_capped(srv, tmp_path) -> None:
    sleeps: list = []
    srv.fail("/d/file.bin", status=503, times=1, retry_after=100000)
    policy = RetryPolicy(attempts=2, base_delay=0.01, max_retry_after=2.5)
    HttpClient("ds", policy=policy, sleep=sleeps.append).download(srv.url + "/d/file.bin", tmp_path / "f")
    assert sleeps == [2.5]


def test_head_reports_size(srv) -> None:
    info = client().head(srv.url + "/d/file.bin")
    assert info.size == len(DATA) and info.accepts_ranges


def test_unreachable_host_fails_within_bounds(tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(FetchError, match="failed after 3 attempts"):
        client().download(f"http://127.0.0.1:{port}/x", tmp_path / "f")


def test_a_host_that_never_answered_is_given_up_within_its_budget(srv, tmp_path) -> None:
    """Connection failures stop before the tries run out once the budget would be passed; HTTP answers do not."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = RetryPolicy(attempts=10, base_delay=1.0, max_delay=8.0, connect_timeout=2, unreachable_after=6)
    sleeps: list[float] = []
    c = HttpClient("ds", policy=policy, sleep=sleeps.append, seed=1)
    with pytest.raises(FetchError, match="no answer from the host after [2-4] attempts") as err:
        c.get_json(f"http://127.0.0.1:{port}/info")
    assert "connection refused" in str(err.value) and sum(sleeps) + policy.connect_timeout <= 6 + 8
    srv.fail("/d/file.bin", status=503, times=10)  # the host answers: every try is used
    sleeps.clear()
    with pytest.raises(FetchError, match="failed after 10 attempts"):
        HttpClient("ds", policy=policy, sleep=sleeps.append, seed=1).get_bytes(srv.url + "/d/file.bin")
    assert len(sleeps) == 9


# -- small whole responses (APIs, listings, tiles) -------------------------------------------


def _api(srv: ReplicaServer) -> None:
    def image(match, query):
        if match.group(1) == "404":
            return 404, b'{"message": "Image 404 not found"}', "application/json"
        return 200, ('{"id": %s, "q": %r}' % (match.group(1), query.get("q", [""])[0])).replace("'", '"').encode(), \
            "application/json"

    srv.route(r"/api/images/(\d+)/", image)
    srv.route(r"/html/", lambda m, q: (200, b"<!DOCTYPE html><html><body>Maintenance</body></html>", "text/html"))


def test_get_json_through_a_route_with_query_and_retries(srv) -> None:
    _api(srv)
    srv.fail("/api/images/7/", status=503, times=2)
    assert client().get_json(srv.url + "/api/images/7/?q=a+b") == {"id": 7, "q": "a b"}
    log = srv.requests_for("/api/images/7/")
    assert [r.status for r in log] == [503, 503, 200] and log[-1].query == "q=a+b"


def test_html_instead_of_json_is_one_fetch_error(srv) -> None:
    _api(srv)
    with pytest.raises(FetchError, match=r"ds: .*/html/: the response is not JSON \(it starts with '<!DOCTYPE html>"):
        client().get_json(srv.url + "/html/")


def test_api_404_is_a_fetch_error_and_probe_says_none(srv) -> None:
    _api(srv)
    with pytest.raises(FetchError, match="HTTP 404"):
        client().get_json(srv.url + "/api/images/404/")
    assert client().probe(srv.url + "/d/missing.bin") is None
    info = client().probe(srv.url + "/d/file.bin")
    assert info is not None and info.size == len(DATA) and info.accepts_ranges


def test_get_bytes_refuses_more_than_its_cap(srv) -> None:
    assert client().get_bytes(srv.url + "/d/file.bin") == DATA
    with pytest.raises(FetchError, match="announces 101636 bytes, more than the 1000"):
        client().get_bytes(srv.url + "/d/file.bin", max_bytes=1000)


def test_a_route_can_be_cut_like_a_file(srv) -> None:
    _api(srv)
    srv.drop_after("/api/images/9/", nbytes=5, times=1)
    assert client().get_json(srv.url + "/api/images/9/") == {"id": 9, "q": ""}
    assert [r.status for r in srv.requests_for("/api/images/9/")] == [200, 200]


def test_requests_carry_emdata_user_agent(srv) -> None:
    from emdata.transport.client import USER_AGENT

    client().head(srv.url + "/d/file.bin")
    assert srv.requests_for("/d/file.bin")[-1].headers["User-Agent"] == USER_AGENT
