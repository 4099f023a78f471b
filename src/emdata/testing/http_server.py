"""A static HTTP/1.1 server on loopback that behaves like the real file servers, plus faults.

It serves a folder with ``HEAD``, ``GET`` and single ``Range`` requests (206, 416), keep-alive,
validators as Apache sends them (``ETag`` from inode, size and mtime; ``Last-Modified``) with
``If-Range`` (a validator that no longer matches gets the whole file, 200), and Apache-style HTML
directory listings. Tests inject faults per URL path (quoted or not) and read the request log:

- ``drop_after(path, nbytes, times)``: send the headers and ``nbytes`` of the body, then close;
- ``fail(path, status, times, retry_after)``: answer 500/503/429 (with ``Retry-After``) first;
- ``truncate(path, nbytes)``: serve only the first ``nbytes`` as if they were the whole file;
- ``lie_length(path, extra)``: announce ``extra`` more bytes than the file has, then close;
- ``ignore_range(path)``: answer every request with 200 and the whole body, as some servers do.

Dynamic endpoints (APIs) are added with ``route(pattern, handler)``: ``pattern`` is a regular
expression matched against the whole unquoted path, ``handler(match, query)`` returns
``(status, body, content type)`` or, to add headers to a non-200 answer (a redirect's
``Location``), ``(status, body, content type, headers)``. Faults (``fail``, ``drop_after``, ``truncate``) apply to routes
too, so an API call can be made to fail like a file.
"""

from __future__ import annotations

import email.utils
import hashlib
import html
import http.server
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    query: str = ""


@dataclass
class _Faults:
    drop: dict[str, list[int]] = field(default_factory=dict)  # path -> [nbytes, times]
    fail: dict[str, list[Any]] = field(default_factory=dict)  # path -> [status, times, retry_after]
    truncate: dict[str, int] = field(default_factory=dict)
    lie: dict[str, int] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)  # left out of listings, still served
    no_range: set[str] = field(default_factory=set)  # answer 200 with the whole body to Range


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as nginx and other real servers set it: headers and body go out in two writes,
    # and with Nagle the body waits for the client's delayed ACK (~40 ms per small response).
    disable_nagle_algorithm = True
    server: "_Server"

    def log_message(self, *args: Any) -> None:  # quiet: the request log is the record
        pass

    def _record(self, status: int) -> None:
        path, _, query = self.path.partition("?")
        self.server.owner._log(Request(self.command, urllib.parse.unquote(path), dict(self.headers.items()),
                                       status, query))

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _simple(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                content_type: str = "text/plain") -> None:
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, body: bool) -> None:
        owner = self.server.owner
        raw_path, _, query = self.path.partition("?")
        url_path = urllib.parse.unquote(raw_path)
        with owner.lock:
            fail = owner.faults.fail.get(url_path)
            if fail and fail[1] > 0:
                fail[1] -= 1
                headers = {"Retry-After": str(fail[2])} if fail[2] is not None else {}
                return self._simple(fail[0], b"temporarily unavailable\n", headers)
        routed = owner.dispatch(url_path, query)
        if routed is not None:
            status, payload, ctype, *more = routed
            if status != 200:  # a handler may add headers, e.g. Location for a redirect
                return self._simple(status, payload, more[0] if more else None, content_type=ctype)
            return self._send_body(url_path, payload, body, ctype)
        local = owner.local_path(url_path)
        if local is None:
            return self._simple(404, b"not found\n")
        if local.is_dir():
            if not url_path.endswith("/"):
                return self._simple(301, b"", {"Location": url_path + "/"})
            return self._simple(200, owner.listing(url_path, local), content_type="text/html")
        return self._send_body(url_path, local, body)

    def _send_body(self, url_path: str, source: "Path | bytes", body: bool,
                   content_type: str = "application/octet-stream") -> None:
        """Serve a file or an in-memory payload with Range, keep-alive and the path's faults."""
        owner = self.server.owner
        if isinstance(source, Path):
            info = source.stat()
            data_len = info.st_size
            etag = f'"{info.st_ino:x}-{info.st_size:x}-{info.st_mtime_ns:x}"'
            modified = email.utils.formatdate(info.st_mtime, usegmt=True)
        else:
            data_len = len(source)
            etag, modified = f'"{hashlib.sha256(source).hexdigest()[:16]}"', None
        with owner.lock:
            data_len = min(data_len, owner.faults.truncate.get(url_path, data_len))
            lie = owner.faults.lie.get(url_path, 0)
            drop = owner.faults.drop.get(url_path)
            cut = None
            if drop and drop[1] > 0 and body:
                drop[1] -= 1
                cut = drop[0]
        start, end, status = 0, data_len - 1, 200
        header_range = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() not in (etag, modified):
            header_range = None  # another version than the client has: the whole file (RFC 9110 13.1.5)
        if header_range and url_path not in owner.faults.no_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", header_range.strip())
            if not match:
                return self._simple(416, b"", {"Content-Range": f"bytes */{data_len}"})
            start = int(match.group(1))
            end = min(int(match.group(2)), data_len - 1) if match.group(2) else data_len - 1
            if start >= data_len:
                return self._simple(416, b"", {"Content-Range": f"bytes */{data_len}"})
            status = 206
        length = end - start + 1
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if modified:
            self.send_header("Last-Modified", modified)
        self.send_header("Content-Length", str(length + lie))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{data_len + lie}")
        self.end_headers()
        if not body:
            return
        to_send = length if cut is None else min(length, cut)
        if isinstance(source, bytes):
            self.wfile.write(source[start:start + to_send])
        else:
            with open(source, "rb") as fh:
                fh.seek(start)
                left = to_send
                while left > 0:
                    block = fh.read(min(left, 1 << 20))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)
        if cut is not None or lie:
            self.wfile.flush()
            self.close_connection = True  # the announced length was not sent: end the connection


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: clients that open many connections at once (tensorstore
    # reads chunks on up to 32) would see dropped SYNs and a one-second retransmit each.
    request_queue_size = 128
    owner: "ReplicaServer"


class LoopbackServer:
    """The life cycle of a threaded HTTP server on loopback: ``url``, ``start``/``stop``, ``with``.

    Subclasses set ``self._httpd`` (a started-later ``ThreadingHTTPServer``) and ``THREAD_NAME``.
    """

    THREAD_NAME = "emdata-loopback-http"
    _httpd: Any  # a ThreadingHTTPServer
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Any:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=self.THREAD_NAME)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ReplicaServer(LoopbackServer):
    """Serve ``root`` at ``http://127.0.0.1:<port>/``. Use as a context manager."""

    THREAD_NAME = "emdata-replica-http"

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.faults = _Faults()
        self.routes: list[tuple[re.Pattern[str], Any]] = []  # see route()
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.owner = self

    # -- dynamic endpoints ----------------------------------------------------------------------

    def route(self, pattern: str, handler: Any) -> None:
        """Answer paths that fully match ``pattern`` with ``handler(match, query) -> (status, body, type)``.

        ``query`` is the parsed query string (``dict[str, list[str]]``). Later routes win.
        """
        self.routes.insert(0, (re.compile(pattern), handler))

    def dispatch(self, url_path: str, query: str) -> tuple[Any, ...] | None:
        for pattern, handler in list(self.routes):
            match = pattern.fullmatch(url_path)
            if match is not None:
                return handler(match, urllib.parse.parse_qs(query, keep_blank_values=True))
        return None

    # -- request log ----------------------------------------------------------------------------

    def _log(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def requests_for(self, path_suffix: str) -> list[Request]:
        path_suffix = urllib.parse.unquote(path_suffix)
        with self.lock:
            return [r for r in self.requests if r.path.endswith(path_suffix)]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- faults ---------------------------------------------------------------------------------

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        self.faults.drop[urllib.parse.unquote(path)] = [nbytes, times]

    def fail(self, path: str, status: int = 503, times: int = 1, retry_after: int | None = None) -> None:
        self.faults.fail[urllib.parse.unquote(path)] = [status, times, retry_after]

    def truncate(self, path: str, nbytes: int) -> None:
        self.faults.truncate[urllib.parse.unquote(path)] = nbytes

    def lie_length(self, path: str, extra: int) -> None:
        self.faults.lie[urllib.parse.unquote(path)] = extra

    def ignore_range(self, path: str) -> None:
        self.faults.no_range.add(urllib.parse.unquote(path))

    def hide(self, path: str) -> None:
        self.faults.hidden.add(urllib.parse.unquote(path))

    def reset(self) -> None:
        """No faults and an empty log (between tests sharing a server); routes and files stay."""
        with self.lock:
            self.faults = _Faults()
            self.requests.clear()

    # -- files ----------------------------------------------------------------------------------

    def local_path(self, url_path: str) -> Path | None:
        """The served file for a URL path (quoted or not), or None."""
        candidate = (self.root / urllib.parse.unquote(url_path).lstrip("/")).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            return None
        return candidate if candidate.exists() else None

    def listing(self, url_path: str, folder: Path) -> bytes:
        """An Apache-style autoindex page, as on the EBI and EPFL servers."""
        rows = []
        for entry in sorted(folder.iterdir()):
            name = entry.name + ("/" if entry.is_dir() else "")
            if url_path + name in self.faults.hidden or name.endswith(".part"):
                continue
            href = urllib.parse.quote(name)
            size = "-" if entry.is_dir() else str(entry.stat().st_size)
            rows.append(f'<tr><td><a href="{href}">{html.escape(name)}</a></td><td align="right">{size}</td></tr>')
        title = html.escape(f"Index of {url_path}")
        page = (f"<!DOCTYPE HTML PUBLIC \"-//W3C//DTD HTML 3.2 Final//EN\">\n<html><head><title>{title}</title></head>"
                f"<body><h1>{title}</h1><table><tr><th>Name</th><th>Size</th></tr>"
                f'<tr><td><a href="../">Parent Directory</a></td><td>-</td></tr>{"".join(rows)}</table></body></html>\n')
        return page.encode()

    def add_file(self, url_path: str, data: bytes) -> Path:
        """Place ``data`` at ``url_path`` (unquoted) under the served root."""
        target = self.root / urllib.parse.unquote(url_path).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target


def serve_forever(root: str, port: int = 0) -> None:  # pragma: no cover - manual use
    with ReplicaServer(Path(root), port=port) as server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    import sys

    serve_forever(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
