"""HTTP download speed: `emdata fetch` versus curl, from a real nginx on loopback.

Requires Debian's ``nginx-light`` (``apt-get install -y nginx-light``) and ``curl``; installs
nothing itself. Generates (or reuses) a file under ``benchmarks/.work/fetch_http/``, serves it
with nginx on 127.0.0.1 (a free port, its own config and prefix: sendfile on, no access log,
the current user, pid and temp files inside the work folder, stopped at exit), then times in
this one run, alternating, best of ``--repeat``:

- curl: ``curl -s -o <file> http://127.0.0.1:PORT/big.bin``;
- emdata: ``python -m emdata -q fetch bench`` in a throw-away project whose params.yaml pins the
  file's size and sha256 (so the run includes hashing, the checks, fsync and the rename; the
  Python start-up and imports count too). ``data/raw`` is deleted before each run. The same
  command for a 4 KiB file (dataset ``tiny``) shows the CLI's fixed cost, which is also printed.
  The child runs with bytecode caching on (as an installed package does) after one warm-up.

Before each timed run the previous output is deleted and ``sync`` lets the disk settle, so no
run pays for the write-back or discards that an earlier one left behind.

    python benchmarks/fetch_http.py --gib 1 --repeat 3

Prints MB/s for both and the ratio curl time / emdata time (1.0 = as fast as curl).

To compare versions of the code in the same run, name each source tree with ``--src LABEL=PATH``
(repeatable; default: this checkout's ``src``); every round then times curl and each tree in turn.
An older commit's tree is one ``git archive <commit> src | tar -x -C <folder>`` away. ``--plain``
adds a copy of this checkout's ``src`` whose ``transport/sink.py`` is ``benchmarks/plain_sink.py``
(write and hash one buffer after the other on one thread, fsync at the end): the baseline that
decides whether the O_DIRECT sink earns its keep.

    python benchmarks/fetch_http.py --gib 1 --repeat 5 --src before=/tmp/old/src --src after=src --plain
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work" / "fetch_http"
BLOCK = 64 << 20


def find_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None)


def make_file(path: Path, size: int) -> str:
    """A file of ``size`` incompressible bytes (reused when present); returns its sha256."""
    stamp = path.with_name(path.name + ".sha256")
    if path.exists() and path.stat().st_size == size and stamp.exists():
        recorded_size, _, digest = stamp.read_text().strip().partition(" ")
        if recorded_size == str(size) and path.stat().st_mtime_ns <= stamp.stat().st_mtime_ns:
            return digest
    print(f"generating {size} bytes in {path} ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    block = os.urandom(BLOCK)
    with open(path, "wb") as fh:
        left = size
        while left:
            piece = block[: min(left, BLOCK)]
            # vary every block so no two are alike (nothing downstream can dedupe or compress)
            piece = hashlib.sha256(left.to_bytes(8, "little")).digest() + piece[32:]
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
    stamp.write_text(f"{size} {digest.hexdigest()}\n")
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(nginx: str, www: Path, work: Path) -> tuple[subprocess.Popen, int]:
    prefix = work / "nginx"
    if prefix.exists():
        shutil.rmtree(prefix)
    for sub in ("logs", "tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
        (prefix / sub).mkdir(parents=True)
    port = free_port()
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {www};
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")],
                            stdin=subprocess.DEVNULL)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful stop of master and worker
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    atexit.register(stop)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (prefix / "logs/error.log")
            sys.exit(f"nginx exited with code {proc.returncode}: {log.read_text() if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    sys.exit("nginx did not start listening within 10 s")


def make_project(project: Path, port: int, files: dict[str, tuple[str, int, str]]) -> None:
    """params.yaml with one epfl dataset per ``key: (file name, size, sha256)``."""
    project.mkdir(parents=True, exist_ok=True)
    text = "normalize: {chunks: [64, 64, 64]}\ndatasets:\n"
    for key, (name, size, sha256) in files.items():
        text += f"""  {key}:
    title: t
    license: l
    citation: c
    modality: FIB-SEM
    voxel_size_nm: [5, 5, 5]
    source:
      kind: epfl
      base_url: "http://127.0.0.1:{port}/"
      image: {{file: {name}, size: {size}, sha256: {sha256}}}
"""
    (project / "params.yaml").write_text(text)


def settle() -> None:
    """Let the disk finish what earlier runs left (write-back, discards of deleted files)."""
    os.sync()
    time.sleep(0.5)


def run_curl(url: str, out: Path) -> float:
    out.unlink(missing_ok=True)
    settle()
    t0 = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    return time.perf_counter() - t0


def source_trees(specs: list[str]) -> dict[str, Path]:
    """``LABEL=PATH`` -> {label: path}; none given: this checkout's src as "emdata"."""
    trees: dict[str, Path] = {}
    for spec in specs or [f"emdata={REPO / 'src'}"]:
        label, sep, path = spec.partition("=")
        if not sep or not label or not (Path(path) / "emdata" / "__init__.py").is_file():
            sys.exit(f"--src {spec!r}: expected LABEL=PATH with PATH/emdata/__init__.py")
        trees[label] = Path(path).resolve()
    return trees


def plain_tree(src: Path) -> Path:
    """A copy of ``src`` with benchmarks/plain_sink.py as transport/sink.py."""
    tree = WORK / "plain" / "src"
    shutil.rmtree(tree.parent, ignore_errors=True)
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(HERE / "plain_sink.py", tree / "emdata" / "transport" / "sink.py")
    return tree


def child_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("EMDATA_DEBUG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: modules load from their bytecode cache
    return env


def spread(times: list[float]) -> str:
    return f"{min(times):.2f}-{max(times):.2f} s"


def run_emdata(project: Path, env: dict[str, str], key: str, name: str, size: int) -> float:
    shutil.rmtree(project / "data" / "raw", ignore_errors=True)  # also data/raw/.partial
    settle()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "emdata", "-q", "fetch", key], cwd=project, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    got = project / "data" / "raw" / key / name
    if got.stat().st_size != size:
        sys.exit(f"emdata fetched {got.stat().st_size} bytes, expected {size}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="file size in GiB (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating (best counts)")
    parser.add_argument("--src", action="append", default=[], metavar="LABEL=PATH",
                        help="a source tree to time (repeatable; default: this checkout's src)")
    parser.add_argument("--plain", action="store_true",
                        help="also time this checkout with benchmarks/plain_sink.py as its sink")
    args = parser.parse_args()
    trees = source_trees(args.src)
    if args.plain:
        trees["plain"] = plain_tree(REPO / "src")

    nginx = find_nginx()
    if nginx is None:
        sys.exit("nginx is missing: this benchmark needs a real web server; install Debian's nginx-light "
                 "(apt-get install -y nginx-light) and run it again")
    if shutil.which("curl") is None:
        sys.exit("curl is missing: install it (apt-get install -y curl) and run it again")

    size = int(args.gib * (1 << 30))
    www = WORK / "www"
    sha256 = make_file(www / "big.bin", size)
    with open(www / "big.bin", "rb") as fh:  # warm the page cache: measure the transfer, not the disk
        while fh.read(BLOCK):
            pass
    tiny = os.urandom(4096)
    (www / "tiny.bin").write_bytes(tiny)
    _, port = start_nginx(nginx, www, WORK)
    url = f"http://127.0.0.1:{port}/big.bin"
    project = WORK / "project"
    make_project(project, port, {"bench": ("big.bin", size, sha256),
                                 "tiny": ("tiny.bin", len(tiny), hashlib.sha256(tiny).hexdigest())})
    envs = {label: child_env(src) for label, src in trees.items()}
    print(f"nginx {nginx} on 127.0.0.1:{port}; {size} bytes; "
          + ", ".join(f"{label}: {src}" for label, src in trees.items()), flush=True)
    for env in envs.values():
        run_emdata(project, env, "tiny", "tiny.bin", len(tiny))  # warm-up, writes the bytecode cache

    curl_times: list[float] = []
    times: dict[str, list[float]] = {label: [] for label in trees}
    startup: dict[str, list[float]] = {label: [] for label in trees}
    for i in range(args.repeat):
        curl_times.append(run_curl(url, WORK / "curl.out"))
        line = f"run {i + 1}: curl {curl_times[-1]:.2f} s"
        for label, env in envs.items():
            times[label].append(run_emdata(project, env, "bench", "big.bin", size))
            startup[label].append(run_emdata(project, env, "tiny", "tiny.bin", len(tiny)))
            line += f", {label} {times[label][-1]:.2f} s (4 KiB: {startup[label][-1]:.2f} s)"
        print(line, flush=True)
    (WORK / "curl.out").unlink(missing_ok=True)
    shutil.rmtree(project / "data", ignore_errors=True)

    mb = size / 1e6
    curl_best = min(curl_times)
    print(f"curl: best {curl_best:.2f} s {mb / curl_best:6.0f} MB/s (all runs {spread(curl_times)})")
    for label in trees:
        best, fixed = min(times[label]), min(startup[label])
        print(f"{label}: best {best:.2f} s {mb / best:6.0f} MB/s (all runs {spread(times[label])}; CLI start-up, "
              f"sha256, fsync and rename included); ratio curl_time / emdata_time {curl_best / best:.2f}")
        if best > fixed:
            print(f"  of which the CLI's fixed cost (a 4 KiB fetch) is {fixed:.2f} s; without it {mb / (best - fixed):.0f} "
                  f"MB/s, ratio {curl_best / (best - fixed):.2f}")


if __name__ == "__main__":
    main()
