"""``emdata demo``: the whole job offline, in a temporary copy of the repository.

1. Copy the repository (its git-tracked files), start the registered replica of every source
   kind in params.yaml (:mod:`emdata.testing.registry`) and point each dataset at it; start a
   real S3 server (SeaweedFS) on loopback.
2. ``dvc repro`` (fetch -> normalize -> summarize), then ``dvc repro`` again, which must do nothing.
3. ``dvc push`` to the default local remote and to the S3 remote.
4. Fresh ``git clone`` + ``dvc pull`` from each remote; every HDF5 must hash as the producer's.
5. Print the summary table.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from emdata.errors import EmdataError, IntegrityError
from emdata.core.digest import sha256_file
from emdata.testing.dvc import dvc, git, offline_env
from emdata.testing.registry import replica_for
from emdata.testing.loopback import check_loopback
from emdata.testing.s3 import SeaweedS3

log = logging.getLogger(__name__)


def copy_repository(src: Path, dest: Path) -> None:
    """Copy what git tracks (or, outside git, everything but data and caches)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=src, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
    if not names:
        ignore = shutil.ignore_patterns(".git", "data", "cache", "tmp", "*.egg-info", "__pycache__", ".venv")
        shutil.copytree(src, dest, ignore=ignore)
        return
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (src / name).is_file():
            shutil.copy2(src / name, target)


def enable_optional_datasets(params_path: Path, kinds: set[str] | None = None) -> None:
    """Move ``optional_datasets`` under ``datasets``: replicas provide the files users add by hand.
    With ``kinds``, keep only the datasets of those source kinds (tests that need one or two)."""
    params: dict[str, Any] = yaml.safe_load(params_path.read_text())
    params["datasets"].update(params.pop("optional_datasets", None) or {})
    if kinds is not None:
        params["datasets"] = {k: v for k, v in params["datasets"].items() if v["source"]["kind"] in kinds}
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def point_params_at_replicas(params_path: Path, running: dict[str, Any]) -> list[str]:
    """Rewrite every dataset to the running replica of its kind (``running``: kind -> replica)."""
    params: dict[str, Any] = yaml.safe_load(params_path.read_text())
    for key, ds in params["datasets"].items():
        params["datasets"][key] = running[ds["source"]["kind"]].point(key, ds)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    return list(params["datasets"])


def start_replicas(kinds: set[str], root: Path, stack: ExitStack, **options: Any) -> dict[str, Any]:
    """Start the registered replica of each kind; they stop when ``stack`` closes."""

    return {kind: stack.enter_context(replica_for(kind).start(root / kind, **options)) for kind in sorted(kinds)}


def kinds_in(params_path: Path) -> set[str]:
    params: dict[str, Any] = yaml.safe_load(params_path.read_text())
    return {ds["source"]["kind"] for ds in params["datasets"].values()}


def replica_repository(src: Path, repo: Path, replicas: Path, env: dict[str, str], stack: ExitStack, *,
                       coordinate: bool = True, kinds: set[str] | None = None) -> list[str]:
    """A git repository copied from ``src`` whose params point at running replicas; the dataset keys.

    The replicas keep serving until ``stack`` closes. ``kinds``: only the datasets of these kinds.
    """
    copy_repository(Path(src), repo)
    enable_optional_datasets(repo / "params.yaml", kinds)
    running = start_replicas(kinds_in(repo / "params.yaml"), replicas, stack, coordinate=coordinate)
    keys = point_params_at_replicas(repo / "params.yaml", running)
    git(["init", "-q", "-b", "main"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "params point at the loopback replicas"], repo, env)
    return keys


def _hashes(repo: Path, keys: list[str]) -> dict[str, str]:
    return {k: sha256_file(repo / "data" / "processed" / f"{k}.h5") for k in keys}


def _configure_s3(repo: Path, endpoint: str, env: dict[str, str]) -> None:
    # Per-checkout settings go to .dvc/config.local, so the committed config keeps the real URL.
    dvc(["remote", "modify", "--local", "s3", "endpointurl", endpoint], repo, env)


def run_demo(repo_root: Path, *, workdir: Path | None = None, keep: bool = False) -> dict[str, Any]:
    check_loopback()  # fail in seconds, saying what to check, rather than after server time-outs
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="emdata-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    env = offline_env(base / "env")
    producer = base / "work" / "producer"
    try:
        with ExitStack() as stack:
            keys = replica_repository(Path(repo_root), producer, base / "replicas", env, stack, coordinate=False)
            s3 = stack.enter_context(SeaweedS3(base / "s3", access_key=env["AWS_ACCESS_KEY_ID"],
                                               secret_key=env["AWS_SECRET_ACCESS_KEY"]))
            s3.create_bucket("emdata-dvc")
            _configure_s3(producer, s3.endpoint, env)
            log.info("demo: dvc repro in %s", producer)
            dvc(["repro"], producer, env)
            again = dvc(["repro"], producer, env)
            if re.search(r"Running stage '(?!inputs')", again):  # inputs runs every time, by design
                raise EmdataError(f"demo: a second `dvc repro` re-ran stages:\n{again}")
            dvc(["push"], producer, env)
            dvc(["push", "-r", "s3"], producer, env)
            git(["add", "-A"], producer, env)
            git(["commit", "-qm", "demo: dvc repro outputs"], producer, env)
            expected = _hashes(producer, keys)
            checks = {}
            for remote in ("local", "s3"):
                clone = base / "work" / f"clone-{remote}"
                git(["clone", "-q", str(producer), str(clone)], base, env)
                if remote == "s3":
                    _configure_s3(clone, s3.endpoint, env)
                dvc(["pull", "-r", remote], clone, env)
                got = _hashes(clone, keys)
                if got != expected:
                    raise IntegrityError("demo", str(clone), f"pulled HDF5 hashes differ from the producer's "
                                         f"({remote} remote)", "see the dvc output above")
                checks[remote] = got
        summary = (producer / "METADATA_SUMMARY.md").read_text()
        table = [line for line in summary.splitlines() if line.startswith("|")]
        print("\n".join(table))
        for key, digest in expected.items():
            print(f"{key}: sha256 {digest} (producer = local-remote clone = s3 clone)")
        print(f"demo: ok ({len(keys)} datasets; second repro did nothing; pulled from local and S3 remotes)")
        if keep:
            print(f"demo: kept in {base}")
        return {"producer": producer, "hashes": expected, "checks": checks}
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
