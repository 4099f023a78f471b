"""Running git and DVC offline and quietly, for the demo and the tests (see docs/architecture.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from emdata.errors import EmdataError


def offline_env(scratch: Path, *, aws_key: str = "emdata-test", aws_secret: str = "emdata-test-secret") -> dict[str, str]:
    """Environment for dvc/git subprocesses: no analytics, no EC2 metadata probe, no user config."""
    scratch.mkdir(parents=True, exist_ok=True)
    empty = scratch / "empty-aws-config"
    empty.touch()
    for sub in ("dvc-site", "dvc-global", "dvc-system"):
        (scratch / sub).mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(scratch / "dvc-site"),
        DVC_GLOBAL_CONFIG_DIR=str(scratch / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(scratch / "dvc-system"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_ACCESS_KEY_ID=aws_key,
        AWS_SECRET_ACCESS_KEY=aws_secret,
        GIT_AUTHOR_NAME="emdata", GIT_AUTHOR_EMAIL="emdata@localhost",
        GIT_COMMITTER_NAME="emdata", GIT_COMMITTER_EMAIL="emdata@localhost",
        GIT_CONFIG_NOSYSTEM="1",
    )
    # Stages run `python -m emdata`: make that the interpreter running us.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("EMDATA_PROJECT", None)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    """Run a command; on failure raise with its output, so the demo and tests say what broke."""
    proc = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise EmdataError(f"`{' '.join(args)}` failed in {cwd} (exit {proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc.stdout + proc.stderr


def dvc(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env, timeout)


def git(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run(["git", *args], cwd, env)
