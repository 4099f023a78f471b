"""A full disk during fetch and normalize: one line, a non-zero exit, nothing half-written.

Runs on a small tmpfs mounted by the test, so it needs root (CI runs as root); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emdata.testing.epfl import build_epfl_replica, epfl_datasets
from emdata.testing.http_server import ReplicaServer


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _project(disk: Path, base_url: str) -> Path:
    root = disk / "project"
    root.mkdir()
    params = {"normalize": {"chunks": [8, 64, 64]}, "datasets": epfl_datasets(base_url)}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _emdata(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=root, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, -11) and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("emdata: error: ")
    return lines[0]


def test_normalize_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    replica = build_epfl_replica(tmp_path / "www", volume_shape=(40, 200, 300))  # 2.4 MB raw, 2.4 MB output
    with ReplicaServer(replica.root) as server:
        root = _project(small_disk, replica.base_url(server.url))
        assert _emdata(root, "fetch", "epfl_hippocampus").returncode == 0
    line = _one_line(_emdata(root, "normalize", "epfl_hippocampus"))
    assert "not enough free disk space" in line and "epfl_hippocampus" in line
    assert list((root / "data" / "processed").glob("*")) == []
    assert not (root / "data" / "metadata" / "epfl_hippocampus.json").exists()


def test_fetch_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    replica = build_epfl_replica(tmp_path / "www", volume_shape=(80, 200, 300))  # 4.8 MB: does not fit
    with ReplicaServer(replica.root) as server:
        root = _project(small_disk, replica.base_url(server.url))
        line = _one_line(_emdata(root, "fetch", "epfl_hippocampus"))
    assert "epfl_hippocampus" in line and ("No space left" in line or "disk full" in line)
    assert not (root / "data" / "raw" / "epfl_hippocampus").exists()
