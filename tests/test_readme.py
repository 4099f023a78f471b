"""The README's Python examples (first screen and Python API) run as written, in a repository built by `dvc repro`."""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from emdata.testing.demo import copy_repository, point_params_at_replicas
from emdata.testing.dvc import dvc, git, offline_env
from emdata.testing.epfl import RunningEpfl, build_epfl_replica
from emdata.testing.http_server import ReplicaServer
from tests.conftest import REPO

pytestmark = pytest.mark.dvc


def readme_python() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def readme_first_screen_python() -> str:
    """The six-line example before the first section."""
    head = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", head, re.S).group(1)


def test_readme_first_screen_example_is_six_lines() -> None:
    assert len(readme_first_screen_python().strip().splitlines()) == 6


def test_readme_python_example_runs(tmp_path: Path) -> None:
    replica = build_epfl_replica(tmp_path / "www", volume_shape=(20, 30, 40), bench_shape=(96, 256, 320),
                                 coordinate=False)
    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    with ExitStack() as stack:
        server = stack.enter_context(ReplicaServer(replica.root))
        copy_repository(REPO, repo)
        params_path = repo / "params.yaml"  # the example reads an EPFL dataset: serve only those
        params = yaml.safe_load(params_path.read_text())
        params["datasets"] = {k: v for k, v in params["datasets"].items() if v["source"]["kind"] == "epfl"}
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        point_params_at_replicas(params_path, {"epfl": RunningEpfl(replica, server)})
        git(["init", "-q", "-b", "main"], repo, env)
        git(["add", "-A"], repo, env)
        git(["commit", "-qm", "params"], repo, env)
        dvc(["repro", "normalize@epfl_mito_train"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "data"], repo, env)
    git(["tag", "v1.0"], repo, env)
    script = (readme_first_screen_python() + "\nassert len(batch) == 8 and patch.shape == (32, 64, 64)\n"
              + readme_python() + "\nprint('README example ok', first.origin, roi.shape)\n")
    env["EMDATA_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "README example ok" in proc.stdout and "(64, 128, 128)" in proc.stdout
    assert (repo / "prediction.h5").is_file()
