"""The demo's loopback check: quick, one line, says what to check."""

from __future__ import annotations

import socket

import pytest

from emdata.errors import EmdataError
from emdata.testing import loopback


def test_loopback_works_here() -> None:
    loopback.check_loopback()  # raises when bind, connect or the one-byte exchange fails


def test_unusable_loopback_fails_fast_with_a_hint(monkeypatch) -> None:
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(EmdataError) as err:
        loopback.check_loopback()
    assert len(attempts) == 1  # one try, no retry loop: an unusable loopback does not get better by waiting
    text = str(err.value)
    assert "\n" not in text and "Network is unreachable" in text and "ip link set lo up" in text


def test_demo_in_a_network_namespace_without_loopback(tmp_path) -> None:
    """A real network namespace whose `lo` is down (unshare --net): the demo fails at its first check, in one
    line, before it builds any replica (the subprocess's timeout bounds a hang)."""
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a network namespace")
    from tests.conftest import REPO

    proc = subprocess.run(["unshare", "--net", sys.executable, "-m", "emdata", "demo", "--workdir", str(tmp_path / "d")],
                          cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"unshare is not allowed here: {proc.stderr.strip()[:200]}")
    assert not (tmp_path / "d").exists()  # failed before the demo made its folder
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("emdata: error: loopback 127.0.0.1 is not usable") and "ip link set lo up" in lines[0]
