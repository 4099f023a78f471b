"""dvc.yaml depends on exactly the code that decides each stage's bytes (pipeline/code/*.json)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from contextlib import ExitStack
from pathlib import Path

import pytest

from emdata.stages import codedeps
from emdata.params.config import load_config
from emdata.testing.demo import replica_repository
from emdata.sources import KINDS, get_source
from emdata.testing.dvc import dvc, offline_env
from tests.conftest import REPO


def test_committed_fingerprints_are_current() -> None:
    cfg = load_config(REPO)
    assert "labelme_tracking" in cfg.kinds()  # optional datasets' kinds are covered too
    assert codedeps.stale(REPO, cfg.kinds()) == [], "run `python -m emdata code-deps --write` and commit pipeline/code/"


def _emdata_imports(module: str) -> set[str]:
    """Every emdata module a module imports, at top level or inside functions (lazy imports too)."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("emdata"):
            found.add(node.module)
    return {m for m in found if _is_module(m)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name imported from a module, not a module
        return False


# Transports and helpers whose bytes are checked (sizes, hashes), not readers that decide output bytes.
TRANSPORTS = ("emdata.transport.client", "emdata.transport.s3", "emdata.core.digest", "emdata.core.atomic")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_reader_a_source_imports_is_declared(kind) -> None:
    """A source that reads through emdata.io.<x> must list it in READERS, or DVC would miss changes."""
    source = get_source(kind)
    readers = {m for m in _emdata_imports(source.__name__)
               if m.startswith("emdata.io.") and m not in TRANSPORTS}
    assert readers <= set(source.READERS) | set(getattr(source, "FETCHERS", ()))


def test_a_reader_change_changes_only_the_fingerprints_that_use_it(monkeypatch, tmp_path) -> None:
    before = {stage: codedeps.fingerprint("epfl", stage) for stage in codedeps.STAGES}
    edited = tmp_path / "tiff.py"
    edited.write_text(Path(importlib.util.find_spec("emdata.formats.tiff").origin).read_text() + "\n# changed\n")
    real = codedeps._module_file
    monkeypatch.setattr(codedeps, "_module_file", lambda name: edited if name == "emdata.formats.tiff" else real(name))
    after = {stage: codedeps.fingerprint("epfl", stage) for stage in codedeps.STAGES}
    assert after["normalize"] != before["normalize"]
    assert after["fetch"] == before["fetch"]  # EPFL fetch does not decode: the TIFF reader is not its code


@pytest.mark.dvc
def test_dvc_status_sees_exactly_the_stages_whose_code_changed(tmp_path) -> None:
    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    with ExitStack() as stack:
        replica_repository(REPO, repo, tmp_path / "replicas", env, stack, kinds={"epfl"})
        dvc(["repro", "normalize@epfl_mito_train", "normalize@epfl_mito_test"], repo, env)

    def stale() -> list[str]:
        out = dvc(["status", "normalize@epfl_mito_train", "normalize@epfl_mito_test"], repo, env)
        return sorted(set(re.findall(r"^(\w+@\w+):", out, re.M)))

    assert stale() == []
    volume = repo / "src" / "emdata" / "access" / "volume.py"
    volume.write_text(volume.read_text() + "\n# an unrelated change\n")
    assert stale() == []
    code = repo / "pipeline" / "code" / "epfl-normalize.json"
    data = json.loads(code.read_text())
    data["modules"]["emdata.formats.tiff"] = "0" * 64  # what `code-deps --write` records after a reader change
    code.write_text(json.dumps(data))
    assert stale() == ["normalize@epfl_mito_test", "normalize@epfl_mito_train"]
    fetch_code = repo / "pipeline" / "code" / "epfl-fetch.json"
    data = json.loads(fetch_code.read_text())
    data["modules"]["emdata.sources.epfl"] = "1" * 64
    fetch_code.write_text(json.dumps(data))
    out = dvc(["status", "fetch@epfl_mito_train"], repo, env)
    assert "fetch@epfl_mito_train" in out and "modified" in out
