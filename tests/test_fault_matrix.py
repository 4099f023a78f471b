"""Fault matrix (issue 7): every fault, race and hostile input, end to end through the CLI.

Each case runs ``python -m emdata ...`` in subprocesses against loopback replicas on 127.0.0.1
in a fresh project and checks the acceptance rule of issue 7:

- the outcome is either the correct data (voxels compared with the replica's arrays) or an error
  shown as exactly one ``emdata: error: ...`` line, the last one on stderr (other lines are the
  CLI's own ``emdata: `` progress/log lines), with a positive exit code (no signal, no traceback);
- when a run fails, the outputs that existed before it (HDF5, metadata record, raw files) are
  byte-identical afterwards;
- nothing is written outside the project's ``data/`` (checked on the folders the test controls:
  the project, the served replica, a folder outside the project that symlinks point at, and the
  subprocesses' HOME and TMPDIR);
- after the next successful run there are no leftover temporaries (``.*.tmp``, ``*.part`` outside
  ``data/raw/.partial``, ``*.old`` folders, run_tiled's ``.partial``/``.tiling.h5``).

Cases of the Python API (1, 12, 13, 14, 15) build their data with the CLI and then exercise the
API in a fresh ``python -c`` process; there an error must be an ``EmdataError`` with a one-line
message. Every subprocess is bounded by a timeout. The outcome of each case is collected and
printed as a table ``case | outcome | detail`` when the module finishes (visible with ``-s``) and
written to ``<pytest basetemp>/fault_matrix.txt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from requests.models import DEFAULT_REDIRECT_LIMIT

from emdata.testing.epfl import EPFL_PATH, FOLDER, LABEL_VALUES, build_epfl_replica, epfl_datasets
from emdata.transport.retry import RetryPolicy
from emdata.testing.http_server import ReplicaServer
from emdata.testing.volumes import coordinate_volume, write_tiff_stack

DS = "epfl_hippocampus"  # the dataset most cases work on: one image file, volumedata.tif
IMAGE = "volumedata.tif"
RESULTS: list[tuple[str, str, str]] = []  # (case, outcome, detail), in the order the cases ran
SERVER_CAP = 8 << 20  # no scripted response sends more than this
SUMMARY_OUTPUTS = ("METADATA_SUMMARY.md", "thumbnails")  # summarize writes these outside data/ by design


# -- the outcome table -------------------------------------------------------------------------

def _table() -> str:
    rows = [("case", "outcome", "detail"), *RESULTS]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{width[0]}} | {r[1]:<{width[1]}} | {r[2]}" for r in rows]
    lines.insert(1, f"{'-' * width[0]}-+-{'-' * width[1]}-+-{'-' * 40}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _matrix_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if not RESULTS:
        return
    text = _table()
    (tmp_path_factory.getbasetemp() / "fault_matrix.txt").write_text(text)
    sys.__stdout__.write("\n\nfault matrix (issue 7)\n" + text)
    sys.__stdout__.flush()


# -- a server that misbehaves on purpose ---------------------------------------------------------

def _etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Serves the replica's files (GET/HEAD, ``Range: bytes=N-`` with ``If-Range``, an ``ETag`` from
    the content) unless a behaviour is scripted."""

    protocol_version = "HTTP/1.1"
    server: _ScriptedHTTPServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        owner = self.server.owner
        path = urllib.parse.unquote(self.path.split("?")[0])
        behaviour = owner.take(path, self.command)
        owner.log.append((self.command, path, self.headers.get("Range"), behaviour[0] if behaviour else "file"))
        try:
            if behaviour is None:
                self._file(path, body)
            else:
                getattr(self, "_b_" + behaviour[0])(path, body, *behaviour[1:])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _headers(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _data(self, path: str) -> bytes | None:
        local = (self.server.owner.root / path.lstrip("/")).resolve()
        return local.read_bytes() if local.is_file() and self.server.owner.root in local.parents else None

    def _file(self, path: str, body: bool, pieces: int = 1, delay: float = 0.0) -> None:
        data = self._data(path)
        if data is None:
            self._headers(404, {"Content-Length": "0"})
            return
        start, status, extra = 0, 200, {"ETag": _etag(data)}
        match = re.fullmatch(r"bytes=(\d+)-", (self.headers.get("Range") or "").strip())
        if_range = self.headers.get("If-Range")
        if match and (if_range is None or if_range.strip() == _etag(data)):  # else: the whole (new) file
            start = int(match.group(1))
            if start >= len(data):
                self._headers(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                return
            status, extra = 206, {**extra, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        rest = data[start:]
        self._headers(status, {"Content-Length": str(len(rest)), "Accept-Ranges": "bytes",
                               "Content-Type": "application/octet-stream", **extra})
        if not body:
            return
        step = -(-len(rest) // pieces)
        for i in range(0, len(rest), step):
            self.wfile.write(rest[i:i + step])
            self.wfile.flush()
            if delay and i + step < len(rest):
                time.sleep(delay)

    # behaviours: ("name", *args)
    def _b_slow(self, path: str, body: bool, pieces: int, delay: float) -> None:
        self._file(path, body, pieces, delay)

    def _b_bytes(self, path: str, body: bool, data: bytes) -> None:
        """Another version of the file: the given bytes, whole."""
        self._headers(200, {"Content-Length": str(len(data)), "Accept-Ranges": "bytes", "ETag": _etag(data)})
        if body:
            self.wfile.write(data)

    def _b_header(self, path: str, body: bool, status: int, name: str, value: str) -> None:
        """The file (200) or an empty answer (other status) with one header set to ``value`` as sent."""
        data = (self._data(path) or b"") if status == 200 else b""
        self.close_connection = True  # the body ends with the connection whatever the header says
        self.send_response(status)
        self.send_header("Connection", "close")
        self.send_header(name, value)
        if name.lower() != "content-length":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _b_redirect(self, path: str, body: bool, location: str) -> None:
        self._headers(302, {"Location": location, "Content-Length": "0"})

    def _b_stall(self, path: str, body: bool, nbytes: int, seconds: float) -> None:
        data = self._data(path) or b""
        self._headers(200, {"Content-Length": str(len(data)), "Accept-Ranges": "bytes", "ETag": _etag(data)})
        self.wfile.write(data[:nbytes])
        self.wfile.flush()
        self.server.owner.stalls.append(self._wait_for_hangup(seconds))
        self.close_connection = True

    def _wait_for_hangup(self, seconds: float) -> str:
        """Hold the connection up to ``seconds``: "client hung up" when the client closed it first."""
        import select

        deadline = time.monotonic() + seconds  # bounded: a client's read timeout is far shorter
        while time.monotonic() < deadline and not self.server.owner.release.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                return "client hung up"
        return "server gave up"

    def _b_endless(self, path: str, body: bool) -> None:
        self._headers(200, {"Connection": "close", "Content-Type": "application/octet-stream"})
        self._spew(body)

    def _b_huge(self, path: str, body: bool) -> None:
        self._headers(200, {"Content-Length": str(10**12), "Accept-Ranges": "bytes"})
        self._spew(body)

    def _spew(self, body: bool) -> None:
        block, sent = b"x" * 16384, 0
        self.close_connection = True
        try:
            while body and sent < SERVER_CAP:
                self.wfile.write(block)
                sent += len(block)
        finally:
            self.server.owner.spewed.append(sent)


class _ScriptedHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: Scripted

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up mid-response on purpose


class Scripted:
    """``always[path] = behaviour`` for every request, ``once[path] = [behaviour, ...]`` one per GET."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.always: dict[str, tuple] = {}
        self.once: dict[str, list[tuple]] = {}
        self.log: list[tuple[str, str, str | None, str]] = []
        self.spewed: list[int] = []
        self.stalls: list[str] = []  # how each stall ended (_ScriptedHandler._wait_for_hangup)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self._httpd = _ScriptedHTTPServer(("127.0.0.1", 0), _ScriptedHandler)
        self._httpd.owner = self
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def take(self, path: str, method: str) -> tuple | None:
        with self.lock:
            if path in self.always:
                return self.always[path]
            queue = self.once.get(path)
            if method == "GET" and queue:
                return queue.pop(0)
        return None

    def reset(self) -> None:
        self.release.set()
        with self.lock:
            self.always.clear()
            self.once.clear()
            self.log.clear()
            self.spewed.clear()
            self.stalls.clear()
        self.release = threading.Event()

    def gets(self, path_suffix: str) -> list[tuple]:
        return [r for r in self.log if r[0] == "GET" and r[1].endswith(path_suffix)]

    def stop(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()


# -- the shared replica and the golden project ----------------------------------------------------

@dataclass
class World:
    """Module-wide: the replica files, the two servers, and a project built once through the CLI."""

    www: Path
    arrays: dict[str, np.ndarray]
    server: ReplicaServer
    scripted: Scripted
    golden: Path
    added: set[str] = field(default_factory=set)  # files the cases placed in the served folder

    def base_url(self, scripted: bool = False) -> str:
        return (self.scripted.url if scripted else self.server.url) + EPFL_PATH

    def add_file(self, name: str, data: bytes) -> Path:
        path = self.www / FOLDER / name
        path.write_bytes(data)
        self.added.add(str(path.relative_to(self.www)))
        return path

    def add_tiff(self, name: str, array: np.ndarray) -> Path:
        path = self.www / FOLDER / name
        if not path.exists():
            write_tiff_stack(path, array)
        self.added.add(str(path.relative_to(self.www)))
        self.arrays[name] = array
        return path

    def file_bytes(self, name: str) -> bytes:
        return (self.www / FOLDER / name).read_bytes()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("fault_matrix")
    replica = build_epfl_replica(base / "www")
    scripted = Scripted(replica.root)
    with ReplicaServer(replica.root) as server:
        server._httpd.handle_error = lambda request, address: None  # clients hang up on purpose (drops)
        golden = base / "golden"
        golden.mkdir()
        _write_params(golden, epfl_datasets(replica.base_url(server.url)))
        env = _env(base / "golden-home")
        for args in (["fetch", DS], ["normalize", DS]):
            run = _run([sys.executable, "-m", "emdata", *args], golden, env, 60)
            assert run.rc == 0, run.stderr
        try:
            yield World(replica.root, dict(replica.arrays), server, scripted, golden)
        finally:
            scripted.stop()


def _write_params(root: Path, datasets: dict[str, Any], normalize: dict[str, Any] | None = None) -> None:
    params = {"normalize": normalize or {"chunks": [8, 16, 16]}, "datasets": datasets}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMDATA_")}
    (home / "home").mkdir(parents=True, exist_ok=True)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(home / "home"), "TMPDIR": str(home / "tmp"), "PYTHONDONTWRITEBYTECODE": "1",
                "DVC_NO_ANALYTICS": "1"})
    env.update(extra)
    return env


# -- running subprocesses ---------------------------------------------------------------------------

@dataclass
class Run:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_mb: float

    @property
    def error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


# A small launcher for measured runs: it sets resource limits, forks the real command and waits
# for it with os.wait4, writes the command's peak RSS to a file, and exits as the command did (the
# same code, or the same signal). A child forked straight from pytest would report pytest's own
# RSS as its peak (ru_maxrss keeps the high-water mark across exec); the launcher is small.
_MEASURED = """
import os, resource, signal, sys
limit_as, limit_fsize, report = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pid = os.fork()
if pid == 0:
    if limit_as > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    if limit_fsize > 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))
    os.execv(sys.argv[4], sys.argv[4:])
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as fh:
    fh.write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, *, measure: bool = False,
         address_space: int | None = None, file_size: int | None = None) -> Run:
    """Run ``cmd`` bounded by ``timeout``; with ``measure``, its own peak RSS and optional limits."""
    proc = _spawn(cmd, cwd, env, measure=measure, address_space=address_space, file_size=file_size)
    return _finish(proc, cmd, timeout)


def _spawn(cmd: list[str], cwd: Path, env: dict[str, str], *, measure: bool = False,
           address_space: int | None = None, file_size: int | None = None) -> subprocess.Popen:
    report = None
    if measure or address_space or file_size:
        fd, report = tempfile.mkstemp(prefix="emdata-fm-rss-")
        os.close(fd)
        cmd = [sys.executable, "-S", "-c", _MEASURED, str(address_space or 0), str(file_size or 0), report, *cmd]
    out = tempfile.TemporaryFile("w+")  # files, not pipes: a chatty child never blocks  # noqa: SIM115
    err = tempfile.TemporaryFile("w+")  # closed by _finish  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                            start_new_session=True)
    proc._fm_files = (out, err)  # type: ignore[attr-defined]
    proc._fm_report = report  # type: ignore[attr-defined]
    proc._fm_start = time.monotonic()  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, cmd: list[str], timeout: float) -> Run:
    start = proc._fm_start  # type: ignore[attr-defined]
    deadline = start + timeout
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, by its id
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            for fh in proc._fm_files:  # type: ignore[attr-defined]
                fh.close()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(map(str, cmd[2:]))}")
        time.sleep(0.01)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    texts = []
    for fh in proc._fm_files:  # type: ignore[attr-defined]
        fh.seek(0)
        texts.append(fh.read())
        fh.close()
    maxrss = -1.0  # unknown unless measured (ru_maxrss of a child of pytest includes pytest's RSS)
    report = proc._fm_report  # type: ignore[attr-defined]
    if report is not None:
        with contextlib.suppress(OSError, ValueError):
            maxrss = int(Path(report).read_text()) / 1024
        Path(report).unlink(missing_ok=True)
    return Run([str(c) for c in cmd], proc.returncode, texts[0], texts[1], seconds, maxrss)


def one_line_error(run: Run) -> str:
    """The acceptance rule for a failed run; returns the error line."""
    what = f"{' '.join(run.args[2:])!r} exited {run.rc}"
    assert run.rc > 0, f"{what} (killed by signal {-run.rc}); stderr: {run.stderr[-1500:]}"
    assert "Traceback" not in run.stderr, f"{what} with a traceback: {run.stderr[-3000:]}"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("emdata: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"{what}, not one error line: {run.stderr[-1500:]}"
    strays = [line for line in lines if not line.startswith("emdata: ")]
    assert not strays, f"{what}, stray stderr lines: {strays[:3]}"
    return errors[0]


def ok(run: Run) -> Run:
    assert run.rc == 0, f"{run.args[2:]} exited {run.rc}: {run.stderr[-1500:]}"
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    return run


def short(text: str, n: int = 110) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def _err(line: str, n: int = 95) -> str:
    """An error line for the table: without the prefix, paths and URLs cut to their last part."""
    text = line.removeprefix("emdata: error: ")
    text = re.sub(r"(?:[a-z][a-z0-9+.-]*://[^\s;]*|/[^\s;:]*)/([^/\s;:]+)(?=[\s;:,)]|$)", r".../\1", text)
    return "'" + short(text, n) + "'"


# -- snapshots and checks ---------------------------------------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path, *, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """relpath -> sha256 (files), 'dir' (folders), 'link -> target' (symlinks); nothing followed."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            path = here / name
            rel = str(path.relative_to(root))
            if skip(path):
                continue
            if path.is_symlink():
                out[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = _sha(path)
    return out


def outputs(project: Path) -> dict[str, str]:
    """The existing outputs a failed run must leave byte-identical: raw files, HDF5, records.

    Files only (a new empty folder changes no output); not the resumable partial folder, the
    lock files, the cache of verified raw hashes (``.state``), or temporaries (those are what
    ``leftovers`` checks after the next run).
    """
    data = project / "data"

    def skip(p: Path) -> bool:
        rel = p.relative_to(data).parts
        return rel[:2] == ("raw", ".partial") or rel[0] in (".locks", ".state") or p.name.endswith(".tmp") \
            or (p.is_dir() and not p.is_symlink())

    return tree(data, skip=skip)


def leftovers(project: Path) -> list[str]:
    found = []
    data = project / "data"
    for path in data.rglob("*"):
        rel = path.relative_to(project)
        name = path.name
        under_partial = rel.parts[:3] == ("data", "raw", ".partial")
        temporary = (name.startswith(".") and name.endswith(".tmp")) or name.endswith((".old", ".tiling.h5")) \
            or (path.is_file() and name.endswith(".partial"))  # run_tiled's unfinished output
        stray_part = name.endswith(".part") and not under_partial
        unfinished = under_partial and path.is_file()  # every dataset of the case was fetched in the end
        if temporary or stray_part or unfinished:
            found.append(str(rel))
    return found


def voxels(project: Path, key: str, expected: dict[str, np.ndarray]) -> str:
    """Compare the HDF5 arrays with the replica's; return a short description."""
    with h5py.File(project / "data" / "processed" / f"{key}.h5", "r") as f:
        for name, want in expected.items():
            got = f[name][()]
            assert got.shape == want.shape, f"/{name} has shape {got.shape}, the replica {want.shape}"
            wrong = int(np.count_nonzero(got != want))
            assert wrong == 0, f"/{name}: {wrong} of {want.size} voxels differ from the replica"
    shape = "x".join(map(str, next(iter(expected.values())).shape))
    return f"{shape} voxels exact"


def raw_exact(project: Path, www: Path, name: str = IMAGE, key: str = DS) -> str:
    """The fetched file is byte for byte the served one."""
    got, want = _sha(project / "data" / "raw" / key / name), _sha(www / FOLDER / name)
    assert got == want, f"data/raw/{key}/{name} has sha256 {got[:12]}..., the replica's is {want[:12]}..."
    return "raw sha256 = replica's"


class Case:
    """One case's folders, runner and guards."""

    def __init__(self, world: World, tmp: Path, name: str) -> None:
        self.world = world
        self.tmp = tmp
        self.name = name
        self.home = tmp / "env"
        self.outside = tmp / "outside"
        self.outside.mkdir()
        (self.outside / "precious.bin").write_bytes(b"precious bytes outside the project\n")
        (self.outside / "dir").mkdir()
        self.env = _env(self.home)
        self.projects: list[Path] = []
        world.server.faults.drop.clear()
        world.server.faults.fail.clear()
        world.server.faults.truncate.clear()
        world.server.faults.lie.clear()
        world.server.faults.no_range.clear()
        world.server.clear_log()
        world.scripted.reset()
        self._www_before = tree(world.www)
        self._guard_before = self._guarded()

    # projects
    def project(self, name: str = "project", where: Path | None = None) -> Path:
        """A copy of the golden project (epfl_hippocampus fetched and normalized through the CLI)."""
        root = (where or self.tmp) / name
        shutil.copytree(self.world.golden, root, symlinks=True)
        self.projects.append(root)
        return root

    def fresh(self, datasets: dict[str, Any] | None = None, name: str = "project", where: Path | None = None,
              normalize: dict[str, Any] | None = None) -> Path:
        root = (where or self.tmp) / name
        root.mkdir(parents=True)
        _write_params(root, datasets if datasets is not None else epfl_datasets(self.world.base_url()), normalize)
        self.projects.append(root)
        return root

    def edit(self, project: Path, fn: Callable[[dict], None]) -> None:
        params = yaml.safe_load((project / "params.yaml").read_text())
        fn(params)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def image(self, project: Path, **spec: Any) -> None:
        """Set epfl_hippocampus's image spec (and base_url, when given)."""
        base = spec.pop("base_url", None)

        def change(p: dict) -> None:
            src = p["datasets"][DS]["source"]
            src["image"] = {"file": IMAGE, **spec}
            if base:
                src["base_url"] = base

        self.edit(project, change)

    # running
    def cli(self, project: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
            **limits: Any) -> Run:
        return _run([sys.executable, "-m", "emdata", *args], project, env or self.env, timeout, **limits)

    def spawn(self, project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return _spawn([sys.executable, "-m", "emdata", *args], project, env or self.env)

    def python(self, project: Path, code: str, *args: str, timeout: float = 60) -> tuple[Run, dict[str, Any]]:
        """Run ``code`` in a fresh interpreter in ``project``; it prints one JSON line last."""
        run = _run([sys.executable, "-c", code, *args], project, self.env, timeout)
        ok(run)
        return run, json.loads(run.stdout.strip().splitlines()[-1])

    def expected(self, name: str = IMAGE) -> dict[str, np.ndarray]:
        return {"raw": self.world.arrays[name]}

    def raw_exact(self, project: Path, name: str = IMAGE) -> str:
        return raw_exact(project, self.world.www, name)

    # guards
    def _guarded(self) -> dict[str, str]:
        snap = {}
        for label, root in (("outside", self.outside), ("home", self.home)):
            snap.update({f"{label}/{k}": v for k, v in tree(root).items()})
        for i, project in enumerate(self.projects):
            def skip(p: Path, project: Path = project) -> bool:
                return p.relative_to(project).parts[0] == "data"
            snap.update({f"project{i}/{k}": v for k, v in tree(project, skip=skip).items()})
        return snap

    def guard(self) -> None:
        """(Re)take the baseline of everything outside data/ (after the case has set it up)."""
        self._www_before = tree(self.world.www)
        self._guard_before = self._guarded()

    def check_outside(self) -> None:
        after = self._guarded()
        changed = sorted(k for k in set(after) | set(self._guard_before)
                         if after.get(k) != self._guard_before.get(k) and not k.endswith("params.yaml"))
        assert not changed, f"written outside data/: {changed[:5]}"
        www = {k: v for k, v in tree(self.world.www).items() if k not in self.world.added}
        assert www == {k: v for k, v in self._www_before.items() if k not in self.world.added}, \
            "the served replica folder changed"

    def no_leftovers(self, project: Path) -> None:
        found = leftovers(project)
        assert not found, f"leftover temporaries after a successful run: {found}"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (mount -t tmpfs -o size=3m); CI runs as root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=20, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20, check=False)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True, timeout=20)


def poll(predicate: Callable[[], Any], seconds: float, step: float = 0.002) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tmp_of(project: Path, key: str = DS) -> list[Path]:
    return list((project / "data" / "processed").glob(f".{key}.h5.*.tmp"))


# == the cases =======================================================================================
# Each returns (outcome, detail). Outcomes: "data" (the run gave the correct data), "error" (one-line
# error, earlier outputs intact, correct data after the next run), "error+data" (both happened, e.g.
# one of two concurrent runs lost the lock).

SCRIPTED_IMAGE = EPFL_PATH.replace("%20", " ") + IMAGE  # the scripted server's (unquoted) path


def c1_drop_resume(c: Case) -> tuple[str, str]:
    """Connection dropped mid-body: the same run resumes with a Range request."""
    project = c.fresh()
    c.world.server.drop_after(EPFL_PATH + IMAGE, 5000, times=1)
    ok(c.cli(project, "fetch", DS))
    ranges = [r.headers.get("Range") for r in c.world.server.requests_for(IMAGE) if r.method == "GET"]
    assert ranges == [None, "bytes=5000-"], ranges
    c.no_leftovers(project)
    return "data", f"dropped after 5000 B, resumed in the same run with Range bytes=5000-; {c.raw_exact(project)}"


def c2_stall_timeout(c: Case) -> tuple[str, str]:
    """A stalled body with EMDATA_READ_TIMEOUT=0.5: the attempt times out, the retry resumes."""
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    c.world.scripted.once[SCRIPTED_IMAGE] = [("stall", 5000, 20.0)]
    run = ok(c.cli(project, "fetch", DS, env={**c.env, "EMDATA_READ_TIMEOUT": "0.5"}))
    gets = c.world.scripted.gets(IMAGE)
    assert [g[2] for g in gets] == [None, "bytes=5000-"], gets
    assert c.world.scripted.stalls == ["client hung up"], c.world.scripted.stalls  # not the server's 20 s
    c.no_leftovers(project)
    return "data", (f"stalled after 5000 B for 20 s; EMDATA_READ_TIMEOUT=0.5 gave up, retry resumed with Range "
                    f"bytes=5000- ({run.seconds:.1f} s in all); {c.raw_exact(project)}")


def c3_503_retry_after(c: Case) -> tuple[str, str]:
    project = c.fresh()
    c.world.server.fail(EPFL_PATH + IMAGE, 503, times=1, retry_after=1)
    run = ok(c.cli(project, "fetch", DS))
    statuses = [r.status for r in c.world.server.requests_for(IMAGE)]
    assert statuses == [503, 200], statuses
    assert run.seconds >= 0.9, f"Retry-After: 1 not honoured ({run.seconds:.2f} s)"
    c.no_leftovers(project)
    return "data", f"503 + Retry-After: 1, waited, then 200 ({run.seconds:.1f} s); {c.raw_exact(project)}"


def _kill_fetch_mid_download(c: Case, project: Path, name: str) -> int:
    """``kill -9`` a fetch of ``name`` (served slowly by the scripted server) once its .part has bytes;
    the scripted behaviour and log are cleared after. Returns the bytes left in the .part."""
    scripted = EPFL_PATH.replace("%20", " ") + name
    c.world.scripted.always[scripted] = ("slow", 40, 0.1)  # about 4 s for the whole file
    part = project / "data" / "raw" / ".partial" / DS / (name + ".part")
    proc = c.spawn(project, "fetch", DS)
    got = poll(lambda: part.exists() and part.stat().st_size > 0, 8, 0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    killed = _finish(proc, ["", "", "fetch"], 10)
    assert got and killed.rc == -9, f"no .part appeared before the kill (rc {killed.rc})"
    del c.world.scripted.always[scripted]
    c.world.scripted.log.clear()
    return part.stat().st_size


def c4_kill9_fetch(c: Case) -> tuple[str, str]:
    """kill -9 of a fetch mid-download; the next run resumes the .part with a Range request."""
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    have = _kill_fetch_mid_download(c, project, IMAGE)
    ok(c.cli(project, "fetch", DS))
    assert [g[2] for g in c.world.scripted.gets(IMAGE)] == [f"bytes={have}-"], c.world.scripted.log
    c.no_leftovers(project)
    return "data", f"killed with {have} B in .part; the next run sent Range bytes={have}-; {c.raw_exact(project)}"


READER = r"""
import json, os, sys, time
import numpy as np
from emdata import open_dataset
from emdata.errors import AccessError
expected, stop = np.load(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
reads = replaced = wrong = 0
other = []
end = time.monotonic() + 45
while time.monotonic() < end and not (os.path.exists(stop) and reads >= 50):
    z, y, x = (int(rng.integers(0, n - k)) for n, k in zip(expected.shape, (6, 9, 11)))
    try:
        vol = open_dataset("epfl_hippocampus")
        patch = vol[z:z + 6, y:y + 9, x:x + 11]
        vol.close()
    except AccessError as exc:
        if "replaced" in str(exc) and "\n" not in str(exc):
            replaced += 1
        else:
            other.append(f"AccessError: {exc}"[:200])
        continue
    except Exception as exc:
        other.append(f"{type(exc).__name__}: {exc}"[:200])
        continue
    reads += 1
    if not np.array_equal(patch, expected[z:z + 6, y:y + 9, x:x + 11]):
        wrong += 1
    time.sleep(0.0005)
print(json.dumps({"reads": reads, "replaced": replaced, "wrong": wrong, "other": other[:5], "n_other": len(other)}))
"""


def r01_reads_during_replacement(c: Case) -> tuple[str, str]:
    """Random patch reads from fresh Volumes while normalize replaces the file (alternating chunks)."""
    project = c.project()
    np.save(c.tmp / "expected.npy", c.world.arrays[IMAGE])
    stop = c.tmp / "stop"
    reader = _spawn([sys.executable, "-c", READER, str(c.tmp / "expected.npy"), str(stop)], project, c.env)
    chunkings = [[5, 7, 9], [8, 16, 16]]
    try:
        for i in range(4):
            c.edit(project, lambda p, i=i: p.__setitem__("normalize", {"chunks": chunkings[i % 2]}))
            ok(c.cli(project, "normalize", DS))
    finally:
        stop.touch()
    run = ok(_finish(reader, ["", "", "reader"], 60))
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["wrong"] == 0, f"{result['wrong']} of {result['reads']} patches mixed two files: {result}"
    assert result["n_other"] == 0, f"errors other than 'replaced, reopen': {result['other']}"
    assert result["reads"] >= 50, result
    c.no_leftovers(project)
    return "data", (f"4 re-normalizations (chunks 5x7x9 <-> 8x16x16) under a reader: {result['reads']} patches "
                    f"exact, {result['replaced']} 'replaced, reopen' errors, 0 mixed; "
                    f"{voxels(project, DS, c.expected())}")


def _pinned_fault(c: Case, behaviour: tuple) -> tuple[str, str]:
    """A re-fetch (size and sha256 now pinned) from a server that sends too much."""
    project = c.project()
    size, sha = len(c.world.file_bytes(IMAGE)), _sha(c.world.www / FOLDER / IMAGE)
    c.image(project, size=size, sha256=sha, base_url=c.world.base_url(scripted=True))
    c.world.scripted.always[SCRIPTED_IMAGE] = behaviour
    before = outputs(project)
    run = c.cli(project, "fetch", DS, timeout=60)
    line = one_line_error(run)
    assert outputs(project) == before, "a failed fetch changed existing outputs"
    partial = project / "data" / "raw" / ".partial" / DS
    biggest = max((p.stat().st_size for p in partial.rglob("*") if p.is_file()), default=0)
    assert biggest <= size, f"{biggest} bytes on disk for a file pinned at {size}"
    gets, sent = len(c.world.scripted.gets(IMAGE)), sum(c.world.scripted.spewed)
    assert gets <= RetryPolicy().attempts, f"{gets} GETs"
    del c.world.scripted.always[SCRIPTED_IMAGE]
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", (f"{_err(line, 75)} in {run.seconds:.1f} s, {gets} GET, server sent <= {sent} B; largest "
                     f"file left {biggest} B (pin {size}); next fetch: {c.raw_exact(project)}")


def r02a_endless_body(c: Case) -> tuple[str, str]:
    return _pinned_fault(c, ("endless",))


def r02b_huge_content_length(c: Case) -> tuple[str, str]:
    return _pinned_fault(c, ("huge",))


def _spec(project: Path, key: str = DS) -> dict[str, Any]:
    from emdata.params.config import load_config
    from emdata.sources.dataset import resolve_dataset

    return resolve_dataset(load_config(project), key).source.to_dict()


def _marker(partial: Path, spec: dict[str, Any]) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    (partial / ".spec.json").write_text(json.dumps(spec))  # compact: a rewrite would change the bytes


def _planted(c: Case, plant: Callable[[Path, Path], None], words: str) -> tuple[str, str]:
    """A fresh project with a symlink planted under data/raw/.partial; fetch must not write through it."""
    project = c.fresh()
    partial = project / "data" / "raw" / ".partial" / DS
    plant(project, partial)
    c.guard()
    run = c.cli(project, "fetch", DS)
    line = one_line_error(run)
    assert re.search(words, line), line
    c.check_outside()  # the link's target is untouched
    requests = len(c.world.server.requests_for(IMAGE))
    for path in (partial / (IMAGE + ".part"), partial / IMAGE, partial):  # what the message says to remove
        if path.is_symlink():
            path.unlink()
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", (f"{_err(line, 80)}; target untouched, {requests} request(s); after removing it: "
                     f"{c.raw_exact(project)}")


def r03a_part_symlink(c: Case) -> tuple[str, str]:
    def plant(project: Path, partial: Path) -> None:
        _marker(partial, _spec(project))
        (partial / (IMAGE + ".part")).symlink_to(c.outside / "precious.bin")

    return _planted(c, plant, "symbolic link")


def r03b_dest_symlink(c: Case) -> tuple[str, str]:
    def plant(project: Path, partial: Path) -> None:
        _marker(partial, _spec(project))
        (partial / IMAGE).symlink_to(c.outside / "precious.bin")

    return _planted(c, plant, "symbolic link")


def r03c_partial_folder_symlink(c: Case) -> tuple[str, str]:
    """data/raw/.partial/<ds> is a link to a folder outside holding a resumable fetch's marker."""
    def plant(project: Path, partial: Path) -> None:
        _marker(c.outside / "dir", _spec(project))
        partial.parent.mkdir(parents=True)
        partial.symlink_to(c.outside / "dir")

    return _planted(c, plant, "symbolic link")


def r03d_lock_symlink(c: Case) -> tuple[str, str]:
    project = c.project()
    lock = project / "data" / ".locks" / f"{DS}.lock"
    lock.unlink(missing_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.symlink_to(c.outside / "precious.bin")
    c.guard()
    before = outputs(project)
    line = one_line_error(c.cli(project, "normalize", DS))
    assert outputs(project) == before
    c.check_outside()
    lock.unlink()
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "error", (f"normalize: {_err(line, 80)}; target untouched; after removing it: "
                     f"{voxels(project, DS, c.expected())}")


def r04_flipped_raw_byte(c: Case) -> tuple[str, str]:
    project = c.project()
    raw = project / "data" / "raw" / DS / IMAGE
    data = bytearray(raw.read_bytes())
    data[256 + 5 * 1961 + 100] ^= 0x01  # a voxel of page 5: same size, only the sha256 can tell
    raw.write_bytes(bytes(data))
    before = outputs(project)
    built = {k: v for k, v in before.items() if not k.startswith("raw")}
    verify = one_line_error(c.cli(project, "verify", DS))
    assert outputs(project) == before
    fetch = ok(c.cli(project, "fetch", DS))
    refetched = "up to date" not in fetch.stdout
    normalize = c.cli(project, "normalize", DS)
    if normalize.rc == 0:  # acceptable only if fetch replaced the flipped file first
        with h5py.File(project / "data" / "processed" / f"{DS}.h5", "r") as f:
            wrong = int(np.count_nonzero(f["raw"][()] != c.world.arrays[IMAGE]))
        assert wrong == 0, (f"verify caught it, but fetch said {fetch.stdout.strip().split(': ')[-1]!r} and normalize "
                            f"exited 0, replacing the good HDF5 with one built from the flipped byte ({wrong} voxel "
                            "wrong)")
        return "error+data", f"verify: {_err(verify, 60)}; fetch re-fetched the file; normalize: 21x37x53 voxels exact"
    line = one_line_error(normalize)
    assert {k: v for k, v in outputs(project).items() if not k.startswith("raw")} == built
    again = ok(c.cli(project, "fetch", DS))  # the next run, as the message says: fetch, then normalize
    rerun = c.cli(project, "normalize", DS)
    assert rerun.rc == 0, (f"fetch said {again.stdout.strip()!r} and normalize still fails: "
                           f"{_err(rerun.error_line, 120)}; the suggested recovery does not work")
    c.no_leftovers(project)
    return "error", (f"verify: {_err(verify, 55)}; fetch: {'re-fetched' if refetched else 'up to date'}; "
                     f"normalize: {_err(line, 60)}; then fetch+normalize: {voxels(project, DS, c.expected())}")


def _set_file(c: Case, project: Path, name: str) -> None:
    def change(p: dict) -> None:
        p["datasets"][DS]["source"]["image"] = {"file": name}

    c.edit(project, change)


def r05a_disk_full_fetch(c: Case) -> tuple[str, str]:
    big = coordinate_volume((80, 200, 300))  # 4.8 MB: does not fit on 3 MB
    c.world.add_tiff("big80.tif", big)
    with tmpfs(c.tmp / "disk", "3m") as disk:
        project = c.fresh(where=disk)
        _set_file(c, project, "big80.tif")
        c.guard()
        line = one_line_error(c.cli(project, "fetch", DS))
        assert not (project / "data" / "raw" / DS).exists()
        remount(disk, "8m")
        ok(c.cli(project, "fetch", DS))
        c.no_leftovers(project)
        detail = c.raw_exact(project, "big80.tif")
        c.check_outside()
        c.projects.remove(project)
    return "error", f"{_err(line, 80)}; after remount to 8m, fetch resumed: {detail}"


def r05b_disk_full_normalize(c: Case) -> tuple[str, str]:
    big = coordinate_volume((40, 200, 300))  # 2.4 MB raw and 2.4 MB output: only one fits on 3 MB
    c.world.add_tiff("big40.tif", big)
    with tmpfs(c.tmp / "disk", "3m") as disk:
        project = c.fresh(where=disk)
        _set_file(c, project, "big40.tif")
        c.guard()
        ok(c.cli(project, "fetch", DS))
        before = outputs(project)
        line = one_line_error(c.cli(project, "normalize", DS))
        assert outputs(project) == before
        remount(disk, "12m")
        ok(c.cli(project, "normalize", DS))
        c.no_leftovers(project)
        detail = voxels(project, DS, {"raw": big})
        c.check_outside()
        c.projects.remove(project)
    return "error", f"{_err(line, 90)}; after remount to 12m: {detail}"


def _fill(disk: Path) -> int:
    """Take all the free space of ``disk`` in one call; return what is left (bytes)."""
    with open(disk / "filler", "wb") as fh:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        for size in (free, free - (64 << 10), free - (256 << 10), free - (1 << 20)):
            with contextlib.suppress(OSError):
                os.posix_fallocate(fh.fileno(), 0, max(size, 1))
                break
    return os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize


def r05c_disk_full_during_hdf5_write(c: Case) -> tuple[str, str]:
    """normalize's free-space check passes, then another writer takes the space while HDF5 writes."""
    big = coordinate_volume((40, 200, 300))
    c.world.add_tiff("big40.tif", big)
    with tmpfs(c.tmp / "disk", "12m") as disk:
        project = c.fresh(where=disk)
        _set_file(c, project, "big40.tif")
        c.guard()
        ok(c.cli(project, "fetch", DS))
        ok(c.cli(project, "normalize", DS))  # an existing output that must survive
        c.edit(project, lambda p: p["normalize"].update(memory_budget_mb=16))  # small tiles: a longer write
        before = outputs(project)
        proc = c.spawn(project, "normalize", DS)
        opened = poll(lambda: [p for p in _tmp_of(project) if _size(p) >= 64 << 10], 20, 0.001)
        left = _fill(disk) if opened else -1
        run = _finish(proc, ["", "", "normalize"], 60)
        if run.rc == 0:
            detail = f"the disk filled too late (normalize succeeded): {voxels(project, DS, {'raw': big})}"
            outcome = "data"
        else:
            line = one_line_error(run)
            assert outputs(project) == before, "the old output changed"
            detail = f"disk filled while the .tmp was open ({left >> 10} KiB left): {_err(line, 80)}"
            outcome = "error"
        (disk / "filler").unlink(missing_ok=True)
        ok(c.cli(project, "normalize", DS))
        c.no_leftovers(project)
        detail += f"; next run: {voxels(project, DS, {'raw': big})}"
        c.check_outside()
        c.projects.remove(project)
    return outcome, detail


def r06a_truncated_record(c: Case) -> tuple[str, str]:
    project = c.project()
    record = project / "data" / "metadata" / f"{DS}.json"
    record.write_text(record.read_text()[:40])
    c.guard()
    before = outputs(project)
    lines = [one_line_error(c.cli(project, cmd, *([] if cmd == "summarize" else [DS])))
             for cmd in ("info", "verify", "summarize")]
    assert all("damaged" in line for line in lines), lines
    assert outputs(project) == before
    assert not any((project / name).exists() for name in SUMMARY_OUTPUTS)
    c.check_outside()
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "error", (f"info, verify, summarize: {_err(lines[0], 70)}; normalize rebuilds: "
                     f"{voxels(project, DS, c.expected())}")


def _redirect(c: Case, location: Callable[[str], str]) -> tuple[str, str]:
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    c.world.scripted.always[SCRIPTED_IMAGE] = ("redirect", location(EPFL_PATH + IMAGE))
    c.guard()
    lines = []
    for cmd in ("plan", "fetch"):
        run = c.cli(project, cmd, DS, timeout=30)
        lines.append(one_line_error(run))
    assert not (project / "data" / "raw" / DS).exists()
    requests = len(c.world.scripted.log)
    # each command follows at most requests' redirect limit once: no retry of a loop, no endless loop
    assert requests <= 2 * (DEFAULT_REDIRECT_LIMIT + 1), f"{requests} requests for plan and fetch"
    c.check_outside()
    del c.world.scripted.always[SCRIPTED_IMAGE]
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", f"plan and fetch: {_err(lines[1], 80)}; {requests} requests; then: {c.raw_exact(project)}"


def r06b_redirect_to_file(c: Case) -> tuple[str, str]:
    return _redirect(c, lambda own: "file:///etc/passwd")


def r06c_redirect_to_ftp(c: Case) -> tuple[str, str]:
    return _redirect(c, lambda own: "ftp://127.0.0.1/volumedata.tif")


def r06d_redirect_loop(c: Case) -> tuple[str, str]:
    return _redirect(c, lambda own: own)


def _race(c: Case, project: Path, command: str) -> list[str]:
    procs = [c.spawn(project, command, DS) for _ in range(2)]
    outcomes = []
    for run in [_finish(p, ["", "", command], 60) for p in procs]:
        if run.rc == 0:
            outcomes.append("ok")
        else:
            line = one_line_error(run)
            assert "another emdata run holds" in line and "pid" in line, line
            outcomes.append(_err(line, 70))
    assert "ok" in outcomes, outcomes
    return outcomes


def r07a_concurrent_fetch(c: Case) -> tuple[str, str]:
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    c.world.scripted.always[SCRIPTED_IMAGE] = ("slow", 20, 0.1)  # about 2 s: the runs overlap
    outcomes = _race(c, project, "fetch")
    del c.world.scripted.always[SCRIPTED_IMAGE]
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return ("error+data" if len(set(outcomes)) > 1 else "data"), \
        f"two fetches at once: {' / '.join(outcomes)}; {c.raw_exact(project)}"


def r07b_concurrent_normalize(c: Case) -> tuple[str, str]:
    project = c.project()
    outcomes = _race(c, project, "normalize")
    c.no_leftovers(project)
    return ("error+data" if len(set(outcomes)) > 1 else "data"), \
        f"two normalizes at once: {' / '.join(outcomes)}; {voxels(project, DS, c.expected())}"


# -- hostile TIFFs (case 8) ----------------------------------------------------------------------

def _patch_long(data: bytearray, tag: Any, value: int) -> None:
    """Rewrite a classic-TIFF IFD entry as one LONG (entry: code, type, count, value)."""
    struct.pack_into("<HI", data, tag.offset + 2, 4, 1)
    struct.pack_into("<I", data, tag.offset + 8, value)


def _replace_description(data: bytearray, tag: Any, text: bytes, pad: bytes) -> None:
    assert len(text) < tag.count, (len(text), tag.count)
    data[tag.valueoffset:tag.valueoffset + tag.count] = text.ljust(tag.count - 1, pad) + b"\0"


def hostile_tiff(kind: str, path: Path) -> bytes:
    """A 2 KB TIFF whose tags and description claim an enormous volume."""
    import tifffile

    vol = (np.arange(3 * 16 * 16) % 251).astype(np.uint8).reshape(3, 16, 16)
    if kind == "imagej":
        tifffile.imwrite(path, vol, imagej=True, metadata={"axes": "ZYX", "Info": "x" * 80})
    else:
        with tifffile.TiffWriter(path, bigtiff=False) as writer:
            for section in vol:
                writer.write(section, photometric="minisblack", contiguous=kind == "shaped",
                             compression="zlib" if kind == "deflate" else None,
                             metadata={"shape": list(vol.shape), "comment": "x" * 60})
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        description = pages[0].tags["ImageDescription"]
        if kind == "shaped":  # 10^6 pages of 10^5 x 10^5 in the JSON description and in every page's tags
            _replace_description(data, description, b'{"shape": [1000000, 100000, 100000]}', b" ")
            for page in pages:
                _patch_long(data, page.tags["ImageWidth"], 100000)
                _patch_long(data, page.tags["ImageLength"], 100000)
        elif kind == "imagej":  # ImageJ: images=10^6 and a first page of 10^5 x 10^5
            _replace_description(data, description, b"ImageJ=1.11a\nimages=1000000\nslices=1000000\nloop=false\n",
                                 b"\n")
            _patch_long(data, pages[0].tags["ImageWidth"], 100000)
            _patch_long(data, pages[0].tags["ImageLength"], 100000)
        else:  # deflate pages that claim 65535 x 65535 (4 GiB each) in one tiny strip
            for page in pages:
                for name in ("ImageWidth", "ImageLength", "RowsPerStrip"):
                    _patch_long(data, page.tags[name], 65535)
    path.write_bytes(bytes(data))
    return bytes(data)


def _hostile(c: Case, kind: str) -> tuple[str, str]:
    name = f"hostile_{kind}.tif"
    c.world.add_file(name, hostile_tiff(kind, c.tmp / name))
    project = c.project()
    _set_file(c, project, name)
    c.guard()
    # A safety net for this shared machine, far above what a correct run needs: 16 GiB of address
    # space, files of at most 256 MiB. Peak RSS is what the case checks.
    limits = {"address_space": 16 << 30, "file_size": 256 << 20, "measure": True}
    ok(c.cli(project, "fetch", DS, **limits))
    before = {k: v for k, v in outputs(project).items() if not k.startswith("raw")}
    run = c.cli(project, "normalize", DS, timeout=30, **limits)
    line = one_line_error(run)
    assert {k: v for k, v in outputs(project).items() if not k.startswith("raw")} == before, \
        "a failed normalize changed the HDF5 or the record"
    assert 0 < run.maxrss_mb < 500, f"peak RSS {run.maxrss_mb:.0f} MB"
    assert not re.search(r"MemoryError|Unable to allocate", line), f"ran out of the 16 GiB address space: {line}"
    c.check_outside()
    _set_file(c, project, IMAGE)
    ok(c.cli(project, "fetch", DS))
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "error", (f"{_err(line, 90)} in {run.seconds:.1f} s, peak RSS {run.maxrss_mb:.0f} MB; "
                     f"back to the real file: {voxels(project, DS, c.expected())}")


def r08a_tiff_shaped_huge(c: Case) -> tuple[str, str]:
    return _hostile(c, "shaped")


def r08b_tiff_imagej_huge(c: Case) -> tuple[str, str]:
    return _hostile(c, "imagej")


def r08c_tiff_deflate_huge_pages(c: Case) -> tuple[str, str]:
    return _hostile(c, "deflate")


# -- hostile params (case 9) ---------------------------------------------------------------------

def _bad_params(c: Case, change: Callable[[Path], None], command: list[str], words: str) -> tuple[str, str]:
    project = c.project()
    good = (project / "params.yaml").read_text()
    change(project)
    c.guard()
    before = outputs(project)
    line = one_line_error(c.cli(project, *command))
    assert re.search(words, line), line
    assert outputs(project) == before
    newline_names = [str(p) for p in (project / "data").rglob("*") if "\n" in p.name]
    assert not newline_names, newline_names
    c.check_outside()
    (project / "params.yaml").write_text(good)
    ok(c.cli(project, *command[:1], DS))
    c.no_leftovers(project)
    shown = " ".join(a if a.isprintable() else repr(a) for a in command)
    return "error", (f"`emdata {shown}`: {_err(line, 85)}; restored params: {command[0]} ok, "
                     f"{voxels(project, DS, c.expected())}")


def r09a_key_with_newline(c: Case) -> tuple[str, str]:
    def change(project: Path) -> None:
        c.edit(project, lambda p: p["datasets"].__setitem__("abc\n", json.loads(json.dumps(p["datasets"][DS]))))

    return _bad_params(c, change, ["fetch", "abc\n"], "dataset keys must match|unknown dataset")


def r09b_duplicate_yaml_key(c: Case) -> tuple[str, str]:
    def change(project: Path) -> None:
        lines = (project / "params.yaml").read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.strip() == f"file: {IMAGE}")
        indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
        lines[at + 1:at + 1] = [f"{indent}sha256: {'a' * 64}", f"{indent}sha256: {'b' * 64}"]
        (project / "params.yaml").write_text("\n".join(lines) + "\n")

    return _bad_params(c, change, ["fetch", DS], "duplicate key 'sha256'")


def r09c_compression_level(c: Case) -> tuple[str, str]:
    def change(project: Path) -> None:
        c.edit(project, lambda p: p["normalize"].update(compression="zstd", compression_level=10**12))

    return _bad_params(c, change, ["normalize", DS], "compression_level")


def r09d_file_source_json(c: Case) -> tuple[str, str]:
    def change(project: Path) -> None:
        _set_file(c, project, "source.json")

    return _bad_params(c, change, ["fetch", DS], "source.json")


def r10_kill9_normalize(c: Case) -> tuple[str, str]:
    """kill -9 of normalize once its .tmp exists; the old output stays, the next run removes the .tmp."""
    big = coordinate_volume((40, 200, 300))  # big enough that the .tmp lives long enough to be seen
    c.world.add_tiff("big40.tif", big)
    project = c.project()
    _set_file(c, project, "big40.tif")
    c.edit(project, lambda p: p["normalize"].update(memory_budget_mb=16))  # many small tiles: a longer write
    ok(c.cli(project, "fetch", DS))
    before = outputs(project)
    for attempt in range(3):
        proc = c.spawn(project, "normalize", DS)
        seen = poll(lambda: [p for p in _tmp_of(project) if _size(p) >= 256 << 10], 20, 0.001)
        if seen:
            os.killpg(proc.pid, signal.SIGKILL)
        run = _finish(proc, ["", "", "normalize"], 30)
        if seen and run.rc == -9:
            break
        assert run.rc == 0, run.stderr[-1000:]
        before = outputs(project)  # it finished first: its output is now the one to keep
    else:
        raise AssertionError("normalize finished before its .tmp could be seen, three times")
    stale = _tmp_of(project)
    assert stale, "the kill left no .tmp (nothing to clean)"
    size = sum(p.stat().st_size for p in stale)
    assert outputs(project) == before, "the killed run changed the HDF5 or the record"
    ok(c.cli(project, "normalize", DS))
    assert not _tmp_of(project), "the next run did not remove the killed run's .tmp"
    c.no_leftovers(project)
    return "data", (f"killed with a {size} B .tmp (attempt {attempt + 1}); HDF5 and record intact; the next run "
                    f"removed the .tmp: {voxels(project, DS, {'raw': big})}")


def _usage(c: Case, args: list[str], words: str) -> tuple[str, str]:
    project = c.project()
    c.guard()
    before = outputs(project)
    run = c.cli(project, *args)
    line = one_line_error(run)
    assert words in line and run.rc == 2, (run.rc, line)
    assert outputs(project) == before
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", f"`emdata {' '.join(args)}` -> exit {run.rc}: {_err(line, 80)}"


def r11a_missing_argument(c: Case) -> tuple[str, str]:
    return _usage(c, ["fetch"], "Missing argument")


def r11b_unknown_command(c: Case) -> tuple[str, str]:
    return _usage(c, ["nosuchcmd"], "No such command")


def r11c_unknown_option(c: Case) -> tuple[str, str]:
    return _usage(c, ["normalize", DS, "--bogus"], "No such option")


SAMPLER = r"""
import json
import numpy as np
from emdata import RandomPatches, open_dataset
vol = open_dataset("fm_sampler")
s = RandomPatches(vol, (6, 12, 14), seed=0, length=10, label="mitochondria", min_foreground=0.9,
                  align_to_chunks=True, max_tries=20)
found, errors = [], []
for i in range(10):
    try:
        found.append([int(v) for v in s.origin(i)])
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
print(json.dumps({"found": found, "errors": errors, "need": int(s.need), "chunks": list(vol.chunks)}))
"""


def r12_aligned_label_sampler(c: Case) -> tuple[str, str]:
    """RandomPatches(align_to_chunks, label, min_foreground) where a single aligned origin is feasible."""
    shape = (37, 53, 71)
    image, label = coordinate_volume(shape), np.zeros(shape, np.uint8)
    label[8:14, 16:28, 32:46] = 255  # exactly one chunk-aligned 6x12x14 patch reaches 90% (chunks 8x16x16)
    c.world.add_tiff("sampler.tif", image)
    c.world.add_tiff("sampler_gt.tif", label)
    project = c.project()

    def add(p: dict) -> None:
        entry = json.loads(json.dumps(p["datasets"]["epfl_mito_train"]))
        entry["source"]["image"] = {"file": "sampler.tif"}
        entry["source"]["labels"] = {"mitochondria": {"file": "sampler_gt.tif"}}
        entry["label_values"] = LABEL_VALUES
        p["datasets"]["fm_sampler"] = entry

    c.edit(project, add)
    ok(c.cli(project, "fetch", "fm_sampler"))
    ok(c.cli(project, "normalize", "fm_sampler"))
    voxels(project, "fm_sampler", {"raw": image, "labels/mitochondria": (label // 255).astype(np.uint8)})
    _, result = c.python(project, SAMPLER)
    need = result["need"]
    for origin in result["found"]:
        box = tuple(slice(o, o + n) for o, n in zip(origin, (6, 12, 14)))
        assert np.count_nonzero(label[box]) >= need, (origin, need)
        assert all(o % ch == 0 for o, ch in zip(origin, result["chunks"])), origin
    assert len(result["found"]) == 10, f"found {len(result['found'])} of 10: {result['errors'][:1]}"
    c.no_leftovers(project)
    return "data", ("10 of 10 chunk-aligned 6x12x14 patches with >= 90% foreground at max_tries=20 (1 feasible "
                    "origin of 48), each checked against the label")


TILED = r"""
import json, sys
from emdata import open_dataset, run_tiled
scale, stop_after = SCALE, int(sys.argv[1])
calls = []
def model(x):  # the same name in both runs; scale makes it another model
    if stop_after and len(calls) >= stop_after:
        raise KeyboardInterrupt  # interrupted
    calls.append(1)
    return x.astype("float32") * scale
try:
    run_tiled(open_dataset("epfl_hippocampus"), model, "data/pred.h5", block_shape=(8, 16, 16), halo=(1, 2, 2))
    state = "completed"
except KeyboardInterrupt:
    state = "interrupted"
print(json.dumps({"state": state, "calls": len(calls)}))
"""

TILED_A = TILED.replace("SCALE", "2.0")
TILED_B = TILED.replace("SCALE", "3.0")  # B's code differs from A's only in a constant


def _model_b_wins(c: Case, model_a: tuple[str, ...], model_b: tuple[str, ...], first_state: dict[str, Any]) -> int:
    """run_tiled with model A (interrupted after 5 blocks), then model B (which triples the input) in
    a new process on the same output: every voxel must be B's. Returns the blocks B computed."""
    project = c.project()
    _, first = c.python(project, *model_a)
    assert first == first_state, first
    _, second = c.python(project, *model_b)
    with h5py.File(project / "data" / "pred.h5", "r") as f:
        got = f["prediction"][()]
    want = c.world.arrays[IMAGE].astype(np.float32) * 3
    wrong = int(np.count_nonzero(got != want))
    assert wrong == 0, (f"{wrong} of {want.size} voxels are not model B's (model A's blocks reused); "
                        f"B computed {second['calls']} blocks")
    c.no_leftovers(project)
    return int(second["calls"])


def r13_run_tiled_other_model(c: Case) -> tuple[str, str]:
    calls = _model_b_wins(c, (TILED_A, "5"), (TILED_B, "0"), {"state": "interrupted", "calls": 5})
    return "data", (f"model A interrupted after 5 of 36 blocks; model B (same name `model`) computed "
                    f"{calls} of 36; output = B(input) exactly")


USERBLOCK = r"""
import json, sys
import h5py, numpy as np
from emdata import open_dataset
expected = np.load(sys.argv[1])
vol = open_dataset("fm_userblock")
rng = np.random.default_rng(1)
wrong = 0
for _ in range(40):
    start = [int(rng.integers(0, n - 1)) for n in vol.shape]
    stop = [int(rng.integers(a + 1, n + 1)) for a, n in zip(start, vol.shape)]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    wrong += int(not np.array_equal(vol[box], expected[box]))
whole = bool(np.array_equal(vol[:, :, :], expected))
print(json.dumps({"wrong": wrong, "whole": whole, "hdf5": h5py.version.hdf5_version,
                  "chunkmap": vol.storage.handle(vol.array).chunkmap is not None}))
"""


def r14_userblock(c: Case) -> tuple[str, str]:
    project = c.project()
    src = project / "data" / "processed" / f"{DS}.h5"
    dst = project / "data" / "processed" / "fm_userblock.h5"
    with h5py.File(src, "r") as s, h5py.File(dst, "w", userblock_size=512) as d:
        for key, value in s.attrs.items():
            d.attrs[key] = value
        s.copy(s["raw"], d, "raw")
    with open(dst, "r+b") as fh:
        fh.write(b"a user block written by another tool\n")
    np.save(c.tmp / "expected.npy", c.world.arrays[IMAGE])
    _, result = c.python(project, USERBLOCK, str(c.tmp / "expected.npy"))
    assert result["wrong"] == 0 and result["whole"], result
    c.no_leftovers(project)
    return "data", (f"512-byte user block, HDF5 {result['hdf5']}: 40 random boxes and the whole volume exact "
                    f"(memory-mapped fast path {'used' if result['chunkmap'] else 'off'})")


NORES = r"""
import json
import numpy as np
from emdata import open_dataset
from emdata.access.volume import Volume
from emdata.errors import EmdataError
try:
    vol = open_dataset("fm_nores")
    out = {"opened": True, "resolution": vol.resolution.tolist()}
except EmdataError as exc:
    out = {"opened": False, "error": f"{type(exc).__name__}: {exc}"}
vol = Volume("data/processed/fm_nores.h5", resolution=(5, 5, 5))
out["given"] = vol.resolution.tolist()
out["sum"] = int(vol[:, :, :].astype(np.int64).sum())
print(json.dumps(out))
"""


def r15_no_resolution(c: Case) -> tuple[str, str]:
    project = c.project()
    dst = project / "data" / "processed" / "fm_nores.h5"
    shutil.copyfile(project / "data" / "processed" / f"{DS}.h5", dst)
    with h5py.File(dst, "r+") as f:
        del f["raw"].attrs["resolution"]
    _, result = c.python(project, NORES)
    assert not result["opened"], f"opened with a guessed resolution {result.get('resolution')}"
    assert "\n" not in result["error"] and "resolution" in result["error"], result
    assert result["given"] == [5, 5, 5] and result["sum"] == int(c.world.arrays[IMAGE].astype(np.int64).sum())
    c.no_leftovers(project)
    return "error", f"open_dataset: {_err(result['error'], 90)}; with resolution=(5,5,5) the voxels read exact"


def r16a_raw_tiff_cut_locally(c: Case) -> tuple[str, str]:
    project = c.project()
    raw = project / "data" / "raw" / DS / IMAGE
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    before = outputs(project)
    line = one_line_error(c.cli(project, "normalize", DS))
    assert outputs(project) == before
    ok(c.cli(project, "fetch", DS))
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "error", f"normalize: {_err(line, 80)}; fetch + normalize: {voxels(project, DS, c.expected())}"


def _normalize_refuses_served_half(c: Case, whole: bytes, name: str, what: str) -> tuple[Path, str]:
    """Serve the first half of ``whole`` as ``name``: fetch takes it, normalize must refuse it in one
    line with the earlier outputs intact. Returns the project and the error line."""
    c.world.add_file(name, whole[: len(whole) // 2])
    project = c.project()
    _set_file(c, project, name)
    c.guard()
    ok(c.cli(project, "fetch", DS))
    before = {k: v for k, v in outputs(project).items() if not k.startswith("raw")}
    run = c.cli(project, "normalize", DS)
    if run.rc == 0:
        with h5py.File(project / "data" / "processed" / f"{DS}.h5", "r") as f:
            shape = f["raw"].shape
        raise AssertionError(f"normalize exited 0 with a {shape} volume from half of a "
                             f"{c.world.arrays[IMAGE].shape} {what} (silently short data)")
    line = one_line_error(run)
    assert {k: v for k, v in outputs(project).items() if not k.startswith("raw")} == before
    c.check_outside()
    return project, line


def r16b_served_half_tiff(c: Case) -> tuple[str, str]:
    """The server consistently serves the first half of the image (unpinned): normalize must refuse it."""
    project, line = _normalize_refuses_served_half(c, c.world.file_bytes(IMAGE), "half.tif", "TIFF")
    _set_file(c, project, IMAGE)
    ok(c.cli(project, "fetch", DS))
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "error", f"normalize: {_err(line, 85)}; the real file again: {voxels(project, DS, c.expected())}"


# -- issue 20 item 9 (idr-cancel): an EMPIAR answer with an absurd image count ----------------------

def t20_09a_empiar_absurd_image_count(c: Case) -> tuple[str, str]:
    """The EMPIAR API claims 3000 images, the mirror lists 11: one line before any HEAD, not 2989 HEADs."""
    from emdata.testing.empiar import RunningEmpiar, build_empiar_replica, empiar_dataset

    key = "empiar_11759"
    replica = build_empiar_replica(c.tmp / "empiar-www")
    with ReplicaServer(replica.root) as server:
        empiar = RunningEmpiar(replica, server)
        empiar.api_changes = {"num_images_or_tilt_series": 3000}
        project = c.fresh({key: empiar_dataset(server.url)})
        c.guard()
        line = one_line_error(c.cli(project, "fetch", key))
        heads = sum(1 for r in server.requests if r.method == "HEAD")
        assert heads == 0, f"{heads} HEAD requests for an image count the listing does not support"
        assert "num_images_or_tilt_series is 3000" in line and "lists 11 files" in line, line
        assert not (project / "data" / "raw" / key).exists()
        empiar.api_changes = {}  # the real count: the same project builds
        ok(c.cli(project, "fetch", key))
        ok(c.cli(project, "normalize", key))
    c.no_leftovers(project)
    assert replica.volume is not None
    return "error", f"fetch: {_err(line, 80)}; 0 HEADs; real count: {voxels(project, key, {'raw': replica.volume})}"
# -- issue 20, access layer (t20-*) -------------------------------------------------------------------

T20_PAIRS = r"""
import json, os
import numpy as np
from emdata import GridPatches, RandomPatches, open_dataset
from emdata.testing.volumes import write_canonical
shape, path = (11, 19, 23), "data/processed/fm_pairs.h5"
def publish(v):  # version v: raw = 1000 * v + (index % 1000), label = v; renamed over the file as normalize does
    raw = (np.arange(np.prod(shape)).reshape(shape) % 1000 + 1000 * v).astype(np.uint16)
    tmp = write_canonical(__import__("pathlib").Path(f"data/processed/fm_pairs_v{v}.h5"), raw,
                          labels={"mito": np.full(shape, v, np.uint8)}, chunks=(4, 8, 8))
    os.replace(tmp, path)
def versions(p):
    return sorted(set(np.unique(p.raw // 1000).tolist()) | set(np.unique(p.label).tolist()))
mixed, pairs = [], 0
publish(1)
sampler = RandomPatches(open_dataset("fm_pairs"), (3, 5, 7), seed=2, length=8, label="mito", min_foreground=0.5)
sampler.origin(0)  # the label is read first (the foreground check)
publish(2)
for i in range(8):
    pairs += 1
    if len(versions(sampler[i])) != 1:
        mixed.append(["label-first", i, versions(sampler[i])])
vol = open_dataset("fm_pairs")
vol[0, 0, 0]  # the image is read first
publish(3)
for p in GridPatches(vol, (5, 9, 11), label="mito"):
    pairs += 1
    if len(versions(p)) != 1:
        mixed.append(["image-first", list(p.origin), versions(p)])
print(json.dumps({"pairs": pairs, "mixed": len(mixed), "first": mixed[:2]}))
"""


def t20_03_image_and_label_one_file(c: Case) -> tuple[str, str]:
    """A sample's image and label while the HDF5 is replaced between its two reads."""
    project = c.project()
    _, result = c.python(project, T20_PAIRS)
    assert result["mixed"] == 0, f"{result['mixed']} of {result['pairs']} samples pair two versions: {result['first']}"
    c.no_leftovers(project)
    return "data", (f"file replaced between a sample's label and image reads: {result['pairs']} image/label "
                    "pairs, each from one version")


T20_TILED = r"""
import json, sys
import torch
from emdata import open_dataset, run_tiled
CALLS = []
class Model(torch.nn.Module):  # the same class in both runs: only a plain attribute differs
    def __init__(self, scale):
        super().__init__()
        self.scale = scale
    def forward(self, x):
        if int(sys.argv[2]) and len(CALLS) >= int(sys.argv[2]):
            raise KeyboardInterrupt  # interrupted (argv: not part of the model)
        CALLS.append(1)
        return x.astype("float32") * self.scale
model = Model(float(sys.argv[1]))
try:
    run_tiled(open_dataset("epfl_hippocampus"), model, "data/pred.h5", block_shape=(8, 16, 16), halo=(1, 2, 2))
    state = "completed"
except KeyboardInterrupt:
    state = "interrupted"
print(json.dumps({"state": state, "calls": len(CALLS), "state_dict": sorted(model.state_dict())}))
"""


def t20_04_run_tiled_attribute_only_model(c: Case) -> tuple[str, str]:
    """run_tiled: torch module A interrupted, then B: same class, same (empty) state_dict, another scale."""
    pytest.importorskip("torch")
    calls = _model_b_wins(c, (T20_TILED, "2.0", "5"), (T20_TILED, "3.0", "0"),
                          {"state": "interrupted", "calls": 5, "state_dict": []})
    return "data", (f"module A (scale 2) interrupted after 5 blocks; module B (scale 3, the same empty "
                    f"state_dict) computed {calls}: output = B(input) exactly")


T20_NOT_EMDATA = r"""
import json, sys
from emdata import open_dataset
from emdata.errors import EmdataError
out = {}
for path in sys.argv[1:]:
    try:
        vol = open_dataset(path)
        out[path] = {"opened": True, "resolution": vol.resolution.tolist(), "offset": vol.offset.tolist()}
    except EmdataError as exc:
        out[path] = {"opened": False, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


def t20_13_hdf5_not_emdatas(c: Case) -> tuple[str, str]:
    """open_dataset on files that are not emdata's: text named .h5, no /raw, zero/NaN/negative voxel sizes."""
    project = c.project()
    good = project / "data" / "processed" / f"{DS}.h5"
    other = project / "data" / "other"  # files from elsewhere (the case writes nothing outside data/)
    other.mkdir()
    (other / "text.h5").write_text("not an HDF5 file\n")
    with h5py.File(other / "noraw.h5", "w") as f:
        f["volume"] = np.zeros((3, 4, 5), np.uint8)
    for name, key, value in (("zero", "resolution", [0.0, 8.0, 8.0]), ("nan", "resolution", [8.0, np.nan, 8.0]),
                             ("negative", "resolution", [8.0, 8.0, -8.0]), ("offset", "offset", [0.0, np.inf, 0.0])):
        shutil.copyfile(good, other / f"{name}.h5")
        with h5py.File(other / f"{name}.h5", "r+") as f:
            f["raw"].attrs[key] = np.asarray(value)
    paths = [str(other / f"{n}.h5") for n in ("text", "noraw", "zero", "nan", "negative", "offset")]
    _, result = c.python(project, T20_NOT_EMDATA, *paths)
    opened = {Path(p).name: r for p, r in result.items() if r["opened"]}
    assert not opened, f"opened with a wrong voxel size or offset: {opened}"
    for path, r in result.items():
        assert "\n" not in r["error"] and path in r["error"], r
    c.no_leftovers(project)
    return "error", f"6 files, each one line naming it, e.g. {_err(result[paths[2]]['error'], 80)}"


def t20_10_bad_scheduler_address(c: Case) -> tuple[str, str]:
    """normalize --scheduler "not a url": one line, no 'Exception ignored' traceback, no 40 s wait."""
    pytest.importorskip("distributed")
    project = c.project()
    before = outputs(project)
    run = c.cli(project, "normalize", DS, "--scheduler", "not a url", timeout=30)
    line = one_line_error(run)
    assert "Exception ignored" not in run.stderr and outputs(project) == before
    c.no_leftovers(project)
    return "error", f"{_err(line, 90)} in {run.seconds:.1f} s"


T20_EPOCHS = r"""
import json
import torch
from torch.utils.data import DataLoader
from emdata import RandomPatches, open_dataset
from emdata.access.torch import PatchDataset
sampler = RandomPatches(open_dataset("epfl_hippocampus"), (3, 5, 7), seed=4, length=6)
dataset = PatchDataset(sampler)
loader = DataLoader(dataset, batch_size=3, num_workers=1, persistent_workers=True)
got, want = {}, {}
for epoch in (0, 1):
    dataset.set_epoch(epoch)
    got[epoch] = torch.cat([b["origin"] for b in loader]).tolist()
    want[epoch] = [list(sampler.origin(i, epoch)) for i in range(6)]
print(json.dumps({"got": got, "want": want}))
"""


def t20_05_set_epoch_persistent_workers(c: Case) -> tuple[str, str]:
    """PatchDataset.set_epoch with DataLoader(persistent_workers=True): each epoch's own patches."""
    pytest.importorskip("torch")
    project = c.project()
    _, result = c.python(project, T20_EPOCHS)
    assert result["got"] == result["want"], f"origins per epoch {result['got']}, expected {result['want']}"
    assert result["want"]["0"] != result["want"]["1"]
    c.no_leftovers(project)
    return "data", "persistent worker: epochs 0 and 1 give their own 6 origins each, equal to the sampler's"
# -- issue 20 (format, geometry) -------------------------------------------------------------------

def t20_02_served_cut_classic_tiff(c: Case) -> tuple[str, str]:
    """A libtiff-style TIFF (each page's strips, then its directory) served cut in half: no half volume."""
    from emdata.testing.volumes import write_libtiff_stack

    whole = write_libtiff_stack(c.tmp / "libtiff.tif", c.world.arrays[IMAGE]).read_bytes()
    project, line = _normalize_refuses_served_half(c, whole, "half_classic.tif", "classic TIFF")
    assert "truncated" in line, line
    c.world.add_file("whole_classic.tif", whole)
    _set_file(c, project, "whole_classic.tif")
    ok(c.cli(project, "fetch", DS))
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "error", f"normalize: {_err(line, 85)}; the whole file: {voxels(project, DS, c.expected())}"


def t20_06_offset_100_voxels_away(c: Case) -> tuple[str, str]:
    """params' offset 100000 nm, the DM3 calibration's 100802 nm at 8 nm pixels: 0.8 % but 100 voxels apart."""
    from emdata.testing.dm3 import calibration, dm3_bytes
    from emdata.testing.empiar import (
        PIXEL_UM,
        RunningEmpiar,
        build_empiar_replica,
        empiar_dataset,
        slice_tags,
    )

    replica = build_empiar_replica(c.tmp / "empiar", shape=(5, 13, 11))
    assert replica.volume is not None
    first = slice_tags(replica.volume[0], 0)
    origin = -12603.0  # pixels: the image starts 12603 x 7.998 nm = 100802 nm along y
    first["ImageList"][1]["ImageData"]["Calibrations"]["Dimension"] = [
        calibration(PIXEL_UM, "µm"), calibration(PIXEL_UM, "µm", origin=origin)]  # Dimension.0 is x
    (replica.folder / replica.names[0]).write_bytes(dm3_bytes(first))
    source_y = -origin * PIXEL_UM * 1000.0
    with ReplicaServer(replica.root) as server:
        RunningEmpiar(replica, server)
        dataset = {**empiar_dataset(server.url), "offset_nm": [0.0, 100000.0, 0.0]}
        project = c.fresh({"fm_empiar": dataset})
        c.guard()
        ok(c.cli(project, "fetch", "fm_empiar"))
        run = c.cli(project, "normalize", "fm_empiar")
        if run.rc == 0:
            with h5py.File(project / "data" / "processed" / "fm_empiar.h5", "r") as f:
                recorded = [float(v) for v in f["raw"].attrs["offset"]]
            raise AssertionError(f"normalize exited 0 recording offset {recorded} nm; the source says y = "
                                 f"{source_y:.0f} nm, {(source_y - 100000) / (PIXEL_UM * 1000):.0f} voxels away")
        line = one_line_error(run)
        assert "offset_nm" in line and "100000" in line, line
        assert not (project / "data" / "processed" / "fm_empiar.h5").exists()
        c.edit(project, lambda p: p["datasets"]["fm_empiar"].update(geometry_trust="source"))
        ok(c.cli(project, "normalize", "fm_empiar"))
        with h5py.File(project / "data" / "processed" / "fm_empiar.h5", "r") as f:
            recorded = [float(v) for v in f["raw"].attrs["offset"]]
        assert abs(recorded[1] - source_y) < 1e-3, recorded
        detail = voxels(project, "fm_empiar", {"raw": replica.volume})
        c.no_leftovers(project)
    return "error", f"normalize: {_err(line, 85)}; geometry_trust: source: offset y {recorded[1]:.0f} nm, {detail}"
# -- issue 20, HTTP transport (t20-*) ----------------------------------------------------------------

def _tiff_bytes(c: Case, array: np.ndarray) -> bytes:
    path = write_tiff_stack(c.tmp / "t20-build" / "v.tif", array)
    data = path.read_bytes()
    path.unlink()
    return data


def t20_01_resume_after_remote_change(c: Case) -> tuple[str, str]:
    """kill -9 mid-download, then the served file changes (same size, only the size pinned, as EPFL
    pins): the next fetch must store the new version whole, never old head + new tail."""
    name = "t20_changing.tif"
    old = coordinate_volume((13, 23, 31))
    new = old[::-1].copy()
    v1, v2 = _tiff_bytes(c, old), _tiff_bytes(c, new)
    assert len(v1) == len(v2) and v1 != v2
    c.world.add_file(name, v1)
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True), file=name, size=len(v1))
    have = _kill_fetch_mid_download(c, project, name)
    c.world.add_file(name, v2)  # the server's file changed in between; its size did not
    ok(c.cli(project, "fetch", DS))
    stored = (project / "data" / "raw" / DS / name).read_bytes()
    assert stored == v2, (f"the stored file mixes versions: {sum(a != b for a, b in zip(stored, v2))} bytes differ "
                          f"from the new one, {sum(a != b for a, b in zip(stored, v1))} from the old one")
    gets = c.world.scripted.gets(name)
    assert [g[2] for g in gets] == [f"bytes={have}-"], gets  # asked to resume; the server sent all (If-Range)
    ok(c.cli(project, "normalize", DS))
    c.no_leftovers(project)
    return "data", (f"killed with {have} B in .part, file changed (same size); the resume's If-Range got the whole "
                    f"new file: raw = new version, {voxels(project, DS, {'raw': new})}")


T20_TRICKLE = {"EMDATA_MIN_RATE": "20000", "EMDATA_RATE_WINDOW": "0.5"}  # the trickle below brings ~2 kB/s


def t20_08a_trickle_then_resume(c: Case) -> tuple[str, str]:
    """The first answer trickles (~100 B every 0.05 s, 20 s for the file): under the minimum rate the
    attempt stalls and the retry resumes from what had arrived."""
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    c.world.scripted.once[SCRIPTED_IMAGE] = [("slow", 400, 0.05)]
    ok(c.cli(project, "fetch", DS, env={**c.env, **T20_TRICKLE}))
    ranges = [g[2] for g in c.world.scripted.gets(IMAGE)]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] and ranges[1] != "bytes=0-", \
        f"expected a stall and one resume, the server saw {ranges}"
    c.no_leftovers(project)
    return "data", f"trickle cut by the minimum rate, resumed with Range {ranges[1][6:]}; {c.raw_exact(project)}"


def t20_08b_trickle_always(c: Case) -> tuple[str, str]:
    """Every answer trickles: fetch fails after its attempts (each one window long) with one line."""
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    c.world.scripted.always[SCRIPTED_IMAGE] = ("slow", 400, 0.05)
    run = c.cli(project, "fetch", DS, env={**c.env, **T20_TRICKLE})
    if run.rc == 0:
        raise AssertionError("fetch waited for the whole trickle and exited 0 (no minimum rate)")
    line = one_line_error(run)
    ranges = [g[2] for g in c.world.scripted.gets(IMAGE)]
    assert "stalled" in line and len(ranges) == 6 and ranges[0] is None and all(ranges[1:]), (line, ranges)
    assert not (project / "data" / "raw" / DS).exists()
    del c.world.scripted.always[SCRIPTED_IMAGE]
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", f"{_err(line, 90)} ({len(ranges)} GETs, each resumed); next run: {c.raw_exact(project)}"


def t20_11_invalid_ipv6_urls(c: Case) -> tuple[str, str]:
    """An invalid IPv6 URL in base_url (list, check, fetch) or in a redirect (fetch): one line each."""
    project = c.fresh()
    c.image(project, base_url="http://[::1/data/")
    for command in ("list", "check"):  # the dataset's problem on stdout, a summary line on stderr
        run = c.cli(project, command)
        one_line_error(run)
        assert f"{DS}.source.base_url: invalid URL" in run.stdout, run.stdout[-500:]
    line = one_line_error(c.cli(project, "fetch", DS))
    assert "base_url: invalid URL" in line, line
    c.image(project, base_url=c.world.base_url(scripted=True))
    c.world.scripted.always[SCRIPTED_IMAGE] = ("redirect", "http://[::1/elsewhere")
    redirect = one_line_error(c.cli(project, "fetch", DS))
    assert "redirected to an invalid URL" in redirect and f"datasets.{DS}.source" in redirect, redirect
    del c.world.scripted.always[SCRIPTED_IMAGE]
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", f"list/check/fetch: {_err(line, 60)}; redirect: {_err(redirect, 60)}; then {c.raw_exact(project)}"


# -- issue 20: records, temporaries, links, the CLI's error boundary (items 12, 14, 15) -------------

def t20_12_wrong_shape_record(c: Case) -> tuple[str, str]:
    """Item 12: a record that is valid JSON of the wrong shape: one line naming the field, no KeyError."""
    project = c.project()
    path = project / "data" / "metadata" / f"{DS}.json"
    good = json.loads(path.read_text())
    variants = {
        "statistics": json.dumps({k: v for k, v in good.items() if k != "statistics"}),
        "shape": json.dumps({**good, "shape": "17x29x43"}),
        f"labels.{next(iter(good['labels']), 'x')}.array_sha256":
            json.dumps({**good, "labels": {name: {"dtype": "uint8"} for name in good["labels"] or ["x"]}}),
        "RecursionError": "[" * 100_000 + "]" * 100_000,  # valid JSON nested deeper than Python recurses
    }
    lines = []
    for field_name, text in variants.items():
        path.write_text(text)
        c.guard()
        before = outputs(project)
        for cmd in ("info", "verify", "summarize"):
            line = one_line_error(c.cli(project, cmd, *([] if cmd == "summarize" else [DS])))
            assert line.startswith(f"emdata: error: {DS}: ") and "damaged" in line and field_name in line \
                and f"emdata normalize {DS}" in line, (cmd, line)
            lines.append(line)
        assert outputs(project) == before
        assert not any((project / name).exists() for name in SUMMARY_OUTPUTS)
    ok(c.cli(project, "normalize", DS))
    ok(c.cli(project, "info", DS))
    c.no_leftovers(project)
    return "error", (f"{len(variants)} shapes x info/verify/summarize, e.g. {_err(lines[3], 70)}; normalize "
                     f"rebuilds: {voxels(project, DS, c.expected())}")


def _grow_until_it_fits(disk: Path, option: Callable[[int], str], start: int, run: Callable[[], Run],
                        steps: int = 12) -> list[str]:
    """Remount ``disk`` one unit larger at a time until ``run`` succeeds; the error lines on the way."""
    lines = []
    for n in range(start, start + steps):
        subprocess.run(["mount", "-o", f"remount,{option(n)}", str(disk)], check=True, capture_output=True,
                       timeout=20)
        result = run()
        if result.rc == 0:
            return lines
        lines.append(one_line_error(result))
    raise AssertionError(f"still failing with {option(start + steps - 1)}: {lines[-3:]}")


def t20_14a_disk_full_at_records(c: Case) -> tuple[str, str]:
    """Item 14: the disk fills at each step of fetch (blocks) and normalize (inodes) in turn: every
    failure is one line naming the dataset and the file, the record included."""
    with tmpfs(c.tmp / "disk", "1m") as disk:
        project = c.fresh(where=disk)
        c.guard()
        st = os.statvfs(disk)
        pages = -(-len(c.world.file_bytes(IMAGE)) // st.f_frsize)
        fetch = _grow_until_it_fits(disk, lambda n: f"size={n * st.f_frsize}", st.f_blocks - st.f_bfree + pages - 1,
                                    lambda: c.cli(project, "fetch", DS))
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True, capture_output=True, timeout=20)
        st = os.statvfs(disk)
        normalize = _grow_until_it_fits(disk, lambda n: f"nr_inodes={n}", st.f_files - st.f_ffree + 1,
                                        lambda: c.cli(project, "normalize", DS))
        for line in fetch + normalize:
            assert line.startswith(f"emdata: error: {DS}: /") or line.startswith(f"emdata: error: {DS}: http"), line
        # Fetch peaks during the download (the .part and its validator; the validator is gone before
        # source.json is written), so its lines name the download: source.json's own full-disk line
        # is test_cli_trust's test_a_full_disk_while_writing_source_json_names_the_dataset_and_the_file.
        assert fetch and all(f".partial/{DS}/" in line for line in fetch), fetch
        assert any(f"metadata/{DS}.json: " in line for line in normalize), normalize
        subprocess.run(["mount", "-o", "remount,nr_inodes=100000", str(disk)], check=True, capture_output=True,
                       timeout=20)
        c.no_leftovers(project)
        detail = f"{c.raw_exact(project)}; {voxels(project, DS, c.expected())}"
        c.check_outside()
        c.projects.remove(project)
    record = next(line for line in normalize if f"metadata/{DS}.json: " in line)
    return "error", (f"{len(fetch)} fetch and {len(normalize)} normalize failures, one line each, e.g. "
                     f"{_err(record, 70)}; then {detail}")


KILL_AT_RENAME = r"""
import os, signal, sys
real_replace, suffix = os.replace, sys.argv[1]
def replace(src, dst, *args, **kwargs):
    if os.fspath(dst).endswith(suffix):  # kill -9 just before the file gets its name
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["emdata", *sys.argv[2:]]
from emdata.cli import main
main()
"""


def t20_14b_kill9_final_steps(c: Case) -> tuple[str, str]:
    """Item 14: kill -9 just before fetch renames source.json and before normalize renames the record;
    the next good runs leave no temporary (none published into data/raw/<ds>)."""
    project = c.fresh()
    stale = []
    for cmd, name, folder in (("fetch", f"/{DS}/source.json", f"raw/.partial/{DS}"),
                              ("normalize", f"/metadata/{DS}.json", "metadata")):
        if cmd == "normalize":  # a second killed normalize: two temporaries of the record
            killed = _run([sys.executable, "-c", KILL_AT_RENAME, name, cmd, DS], project, c.env, 60)
            assert killed.rc == -9, killed.stderr[-1000:]
        killed = _run([sys.executable, "-c", KILL_AT_RENAME, name, cmd, DS], project, c.env, 60)
        assert killed.rc == -9, killed.stderr[-1000:]
        left = sorted(p.name for p in (project / "data" / folder).iterdir() if p.name.endswith(".tmp"))
        assert left, f"the kill before {name} left no temporary"
        stale += left
        ok(c.cli(project, cmd, DS))
        c.no_leftovers(project)
    assert sorted(os.listdir(project / "data" / "raw" / DS)) == sorted([IMAGE, "source.json"])
    return "data", (f"killed before the renames, left {', '.join(stale)}; the next runs removed them: "
                    f"{c.raw_exact(project)}, {voxels(project, DS, c.expected())}")


def t20_14c_symlinked_data_folders(c: Case) -> tuple[str, str]:
    """Item 14: ``data`` itself a link (fetch, normalize) and ``data/processed`` a link (normalize):
    refused before anything is created through the link, the lock file included."""
    project = c.fresh()
    (project / "data").symlink_to(c.outside / "dir")
    c.guard()
    lines = [one_line_error(c.cli(project, cmd, DS)) for cmd in ("fetch", "normalize")]
    assert all("symbolic link" in line and line.endswith("/data: is a symbolic link; remove it; emdata writes "
                                                         "only real files and folders under data/") for line in lines), lines
    c.check_outside()  # no lock file, no folder created in the link's target
    (project / "data").unlink()
    built = c.project("built")
    processed = built / "data" / "processed"
    shutil.move(processed, c.outside / "processed")
    processed.symlink_to(c.outside / "processed")
    c.guard()
    before = outputs(built)
    line = one_line_error(c.cli(built, "normalize", DS))
    assert "data/processed: is a symbolic link" in line, line
    assert outputs(built) == before
    c.check_outside()  # the HDF5 behind the link untouched, no temporary beside it
    processed.unlink()
    ok(c.cli(built, "normalize", DS))
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(built)
    c.no_leftovers(project)
    return "error", (f"fetch and normalize: {_err(lines[0], 60)}; normalize: {_err(line, 60)}; targets untouched; "
                     f"without the links: {voxels(built, DS, c.expected())}")


def t20_15_cli_error_boundary(c: Case) -> tuple[str, str]:
    """Item 15: an exception no code path expected (here a KeyError from an HDF5 attribute removed by
    hand) is one line naming the command; Ctrl-C during a fetch exits 130 with one line."""
    project = c.project()
    h5 = project / "data" / "processed" / f"{DS}.h5"
    with h5py.File(h5, "r+") as f:
        del f["raw"].attrs["array_sha256"]
    record_path = project / "data" / "metadata" / f"{DS}.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "file_sha256": _sha(h5)}))
    c.guard()
    before = outputs(project)
    line = one_line_error(c.cli(project, "verify", DS))
    assert line.startswith(("emdata: error: verify: ", f"emdata: error: {DS}: ")), line
    assert outputs(project) == before
    fresh = c.fresh(name="interrupted")
    c.image(fresh, base_url=c.world.base_url(scripted=True))
    c.world.scripted.always[SCRIPTED_IMAGE] = ("slow", 40, 0.1)  # about 4 s for the whole file
    part = fresh / "data" / "raw" / ".partial" / DS / (IMAGE + ".part")
    # SIGINT handled as in an interactive shell, whatever this runner inherited (a background job's
    # children start with it ignored, and emdata then rightly ignores Ctrl-C too)
    interactive = ("import runpy, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                   "sys.argv = ['emdata', *sys.argv[1:]]\nrunpy.run_module('emdata', run_name='__main__')\n")
    proc = _spawn([sys.executable, "-c", interactive, "fetch", DS], fresh, c.env)
    got = poll(lambda: part.exists() and part.stat().st_size > 0, 8, 0.01)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    interrupted = _finish(proc, ["", "", "fetch"], 30)
    del c.world.scripted.always[SCRIPTED_IMAGE]
    assert got and interrupted.rc == 130, (interrupted.rc, interrupted.stderr[-1500:])
    assert "Traceback" not in interrupted.stderr and interrupted.error_line.startswith("emdata: interrupted"), \
        interrupted.stderr[-1500:]
    ok(c.cli(fresh, "fetch", DS))
    c.no_leftovers(fresh)
    return "error", f"verify: {_err(line, 90)}; Ctrl-C: exit 130, one line; next fetch: {c.raw_exact(fresh)}"


# -- issue 20 items 7, 11 and 16: the fetch record under the lock, non-ASCII digits, advice ----------

T20_LOCK = r"""
import contextlib, hashlib, json, shutil, sys
from pathlib import Path
import h5py, numpy as np
import emdata.stages.normalize.volume as n
from emdata.params.config import load_config
cfg = load_config(Path.cwd())
raw, fetched = cfg.raw_dir(sys.argv[1]), Path(sys.argv[2])
real_lock = n.dataset_lock
@contextlib.contextmanager
def lock_after_a_fetch(*args, **kwargs):
    shutil.rmtree(raw)  # a fetch of the dataset finishes now: its folder is renamed into place
    shutil.move(str(fetched), str(raw))
    with real_lock(*args, **kwargs):
        yield
n.dataset_lock = lock_after_a_fetch
path = n.normalize_dataset(cfg, sys.argv[1])
with h5py.File(path, "r") as f:
    record = json.loads(f["provenance/source_record"][()])
    voxels = np.ascontiguousarray(f["raw"][()])
print(json.dumps({"provenance": record["files"][sys.argv[3]]["sha256"],
                  "raw": hashlib.sha256((raw / sys.argv[3]).read_bytes()).hexdigest(),
                  "voxels": hashlib.sha256(voxels.tobytes()).hexdigest()}))
"""


def t20_07_fetch_finishing_before_the_lock(c: Case) -> tuple[str, str]:
    """Item 7: a fetch of another version (same size) lands just before normalize takes the lock: the
    HDF5's provenance must name the raw file its voxels came from."""
    project = c.fresh()
    c.image(project, base_url=c.world.base_url(scripted=True))
    ok(c.cli(project, "fetch", DS))  # version A
    raw = project / "data" / "raw" / DS
    version_b = np.ascontiguousarray(c.world.arrays[IMAGE][::-1])
    b_bytes = write_tiff_stack(c.tmp / "b.tif", version_b).read_bytes()
    assert len(b_bytes) == len(c.world.file_bytes(IMAGE))  # EPFL pins only the size: it cannot tell
    shutil.move(raw, c.tmp / "version_a")
    c.world.scripted.always[SCRIPTED_IMAGE] = ("bytes", b_bytes)
    ok(c.cli(project, "fetch", DS))  # version B, set aside for the moment the lock is taken
    del c.world.scripted.always[SCRIPTED_IMAGE]
    shutil.move(raw, c.tmp / "version_b")
    shutil.move(c.tmp / "version_a", raw)
    _, result = c.python(project, T20_LOCK, DS, str(c.tmp / "version_b"), IMAGE)
    assert result["voxels"] == hashlib.sha256(version_b.tobytes()).hexdigest(), "voxels are not version B's"
    assert result["provenance"] == result["raw"] == hashlib.sha256(b_bytes).hexdigest(), \
        f"the provenance names {result['provenance'][:12]}..., the raw file is {result['raw'][:12]}..."
    c.no_leftovers(project)
    return "data", "a fetch landing before the lock: voxels and provenance both version B's"


def _ok_or_one_line(c: Case, project: Path, run: Run) -> str:
    """Either exact data or one error line (a traceback is neither)."""
    if run.rc == 0:
        return c.raw_exact(project)
    return _err(one_line_error(run), 70)


def t20_11b_non_ascii_digits(c: Case) -> tuple[str, str]:
    """Item 11: "²" is a digit to str.isdigit() but not to int(): in Content-Length, Retry-After and
    EMDATA_FETCH_WORKERS it is one line or ignored, never a traceback."""
    outcomes = []
    for behaviour in [(200, "Content-Length", "\u00b2"), (503, "Retry-After", "\u00b2"),
                      (200, "Content-Length", "\u0661\u0662")]:
        project = c.fresh(name=f"digits-{len(outcomes)}")
        c.image(project, base_url=c.world.base_url(scripted=True))
        c.world.scripted.once[SCRIPTED_IMAGE] = [("header", *behaviour)]
        outcomes.append(f"{behaviour[1]}: {_ok_or_one_line(c, project, c.cli(project, 'fetch', DS))}")
        c.world.scripted.once.clear()
    project = c.fresh(name="workers")
    line = one_line_error(c.cli(project, "fetch", DS, env={**c.env, "EMDATA_FETCH_WORKERS": "\u00b2"}))
    assert "EMDATA_FETCH_WORKERS" in line, line
    ok(c.cli(project, "fetch", DS))
    c.no_leftovers(project)
    return "error", "; ".join(outcomes) + f"; EMDATA_FETCH_WORKERS=²: {_err(line, 60)}"


def t20_16_rgb_tiff_advice(c: Case) -> tuple[str, str]:
    """Item 16: an RGB TIFF is refused with advice that helps (convert it), not "fetch again"."""
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((3, 13, 11, 3), np.uint8), photometric="rgb")
    c.world.add_file("rgb.tif", buffer.getvalue())
    project = c.project()
    _set_file(c, project, "rgb.tif")
    c.guard()
    ok(c.cli(project, "fetch", DS))
    line = one_line_error(c.cli(project, "normalize", DS))
    assert "convert" in line and "emdata fetch" not in line, line
    return "error", f"normalize: {_err(line, 110)}"


# -- the matrix -------------------------------------------------------------------------------------
CASES: list[Any] = [
    pytest.param(c1_drop_resume, id="c1-drop-mid-body-resume"),
    pytest.param(c2_stall_timeout, id="c2-stall-read-timeout"),
    pytest.param(c3_503_retry_after, id="c3-503-retry-after"),
    pytest.param(c4_kill9_fetch, id="c4-kill9-fetch-resume"),
    pytest.param(r01_reads_during_replacement, id="01-reads-during-replacement"),
    pytest.param(r02a_endless_body, id="02a-endless-body-pinned"),
    pytest.param(r02b_huge_content_length, id="02b-content-length-1e12-pinned"),
    pytest.param(r03a_part_symlink, id="03a-part-is-symlink"),
    pytest.param(r03b_dest_symlink, id="03b-dest-is-symlink"),
    pytest.param(r03c_partial_folder_symlink, id="03c-partial-folder-is-symlink"),
    pytest.param(r03d_lock_symlink, id="03d-lock-file-is-symlink"),
    pytest.param(r04_flipped_raw_byte, id="04-flipped-raw-byte"),
    pytest.param(r05a_disk_full_fetch, id="05a-disk-full-fetch"),
    pytest.param(r05b_disk_full_normalize, id="05b-disk-full-normalize"),
    pytest.param(r05c_disk_full_during_hdf5_write, id="05c-disk-full-during-hdf5-write"),
    pytest.param(r06a_truncated_record, id="06a-truncated-metadata-record"),
    pytest.param(r06b_redirect_to_file, id="06b-redirect-to-file-url"),
    pytest.param(r06c_redirect_to_ftp, id="06c-redirect-to-ftp-url"),
    pytest.param(r06d_redirect_loop, id="06d-redirect-loop"),
    pytest.param(r07a_concurrent_fetch, id="07a-two-fetches-at-once"),
    pytest.param(r07b_concurrent_normalize, id="07b-two-normalizes-at-once"),
    pytest.param(r08a_tiff_shaped_huge, id="08a-tiff-shaped-claims-1e6x1e5x1e5"),
    pytest.param(r08b_tiff_imagej_huge, id="08b-tiff-imagej-claims-1e6-pages"),
    pytest.param(r08c_tiff_deflate_huge_pages, id="08c-tiff-deflate-pages-claim-4GiB"),
    pytest.param(r09a_key_with_newline, id="09a-dataset-key-with-newline"),
    pytest.param(r09b_duplicate_yaml_key, id="09b-duplicate-yaml-key"),
    pytest.param(r09c_compression_level, id="09c-compression-level-1e12"),
    pytest.param(r09d_file_source_json, id="09d-file-source-json"),
    pytest.param(r10_kill9_normalize, id="10-kill9-normalize"),
    pytest.param(r11a_missing_argument, id="11a-missing-argument"),
    pytest.param(r11b_unknown_command, id="11b-unknown-command"),
    pytest.param(r11c_unknown_option, id="11c-unknown-option"),
    pytest.param(r12_aligned_label_sampler, id="12-aligned-label-sampler"),
    pytest.param(r13_run_tiled_other_model, id="13-run-tiled-other-model-same-name"),
    pytest.param(r14_userblock, id="14-hdf5-user-block"),
    pytest.param(r15_no_resolution, id="15-hdf5-without-resolution"),
    pytest.param(r16a_raw_tiff_cut_locally, id="16a-raw-tiff-cut-in-half-locally"),
    pytest.param(r16b_served_half_tiff, id="16b-served-tiff-cut-in-half"),
    pytest.param(t20_09a_empiar_absurd_image_count, id="t20-09a-empiar-image-count-3000-listing-11"),
    pytest.param(t20_03_image_and_label_one_file, id="t20-03-image-and-label-from-one-file-version"),
    pytest.param(t20_04_run_tiled_attribute_only_model, id="t20-04-run-tiled-model-differs-in-an-attribute"),
    pytest.param(t20_05_set_epoch_persistent_workers, id="t20-05-set-epoch-persistent-workers"),
    pytest.param(t20_10_bad_scheduler_address, id="t20-10-scheduler-not-a-url"),
    pytest.param(t20_13_hdf5_not_emdatas, id="t20-13-hdf5-not-emdatas"),
    pytest.param(t20_07_fetch_finishing_before_the_lock, id="t20-07-fetch-lands-before-normalize-locks"),
    pytest.param(t20_11b_non_ascii_digits, id="t20-11b-non-ascii-digits"),
    pytest.param(t20_16_rgb_tiff_advice, id="t20-16-rgb-tiff-advice"),
    pytest.param(t20_02_served_cut_classic_tiff, id="t20-02-served-classic-tiff-cut-in-half"),
    pytest.param(t20_06_offset_100_voxels_away, id="t20-06-offset-100-voxels-away-0.8-percent"),
    pytest.param(t20_01_resume_after_remote_change, id="t20-01-resume-after-remote-file-changed"),
    pytest.param(t20_08a_trickle_then_resume, id="t20-08a-trickle-stalls-then-resumes"),
    pytest.param(t20_08b_trickle_always, id="t20-08b-trickle-fails-after-attempts"),
    pytest.param(t20_11_invalid_ipv6_urls, id="t20-11-invalid-ipv6-url"),
    pytest.param(t20_12_wrong_shape_record, id="t20-12-record-of-the-wrong-shape"),
    pytest.param(t20_14a_disk_full_at_records, id="t20-14a-disk-full-at-source-json-and-record"),
    pytest.param(t20_14b_kill9_final_steps, id="t20-14b-kill9-before-the-final-renames"),
    pytest.param(t20_14c_symlinked_data_folders, id="t20-14c-data-and-processed-are-symlinks"),
    pytest.param(t20_15_cli_error_boundary, id="t20-15-cli-error-boundary"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES)
def test_fault_matrix(case: Callable[[Case], tuple[str, str]], world: World, tmp_path: Path,
                      request: pytest.FixtureRequest) -> None:
    """One row of issue 7's table (or a classic fault), end to end; see the module docstring for the rule."""
    name = request.node.callspec.id
    ctx = Case(world, tmp_path, name)
    try:
        outcome, detail = case(ctx)
        ctx.check_outside()
    except pytest.skip.Exception as exc:
        RESULTS.append((name, "SKIP", short(str(exc.msg), 140)))
        raise
    except BaseException as exc:
        RESULTS.append((name, "FAIL", short(f"{type(exc).__name__}: {exc}", 260)))
        raise
    RESULTS.append((name, outcome, detail))
