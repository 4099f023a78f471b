"""The test tiers themselves: collecting starts nothing, and the fast tier is most of the suite."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

# Collect the whole suite in a fresh interpreter that counts every process and socket it would
# start (subprocess, fork, bind): collection must start none. Libraries whose import probes the
# machine (h5py runs `uname -p`, urllib3 binds ::1 to test IPv6) are imported before counting.
COLLECT = """
import json, os, socket, subprocess, sys
import h5py, requests
import pytest
started = []
popen_init = subprocess.Popen.__init__
def popen(self, *args, **kwargs):
    started.append(("process", str(args[0] if args else kwargs.get("args"))[:80]))
    return popen_init(self, *args, **kwargs)
subprocess.Popen.__init__ = popen
fork = os.fork
os.fork = lambda: started.append(("fork", "")) or fork()
bind = socket.socket.bind
def bound(self, address):
    started.append(("bind", str(address)))
    return bind(self, address)
socket.socket.bind = bound
class Count:
    def __init__(self): self.all = self.fast = 0
    def pytest_collection_finish(self, session):
        self.all = len(session.items)
        self.fast = sum(1 for i in session.items if i.get_closest_marker("slow") is None)
count = Count()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests"], plugins=[count])
print(json.dumps({"code": int(code), "started": started, "all": count.all, "fast": count.fast}))
"""


def test_collecting_the_suite_starts_no_process_and_no_server() -> None:
    proc = subprocess.run([sys.executable, "-c", COLLECT], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stdout[-2000:]
    assert result["started"] == [], result["started"][:5]
    assert result["fast"] >= 0.6 * result["all"], result  # the fast tier is most of the suite
