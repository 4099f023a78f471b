"""dvc.yaml depends on exactly the code that decides each stage's bytes (pipeline/code/*.json)."""

from __future__ import annotations

import importlib.util
import json
import re
from contextlib import ExitStack
from pathlib import Path

import pytest

from emdata.stages import codedeps
from emdata.stages.imports import import_closure, imported_modules, package_modules
from emdata.params.config import load_config
from emdata.sources.dataset import registered_kinds
from emdata.testing.demo import replica_repository
from emdata.sources import KINDS, get_source
from emdata.testing.dvc import dvc, offline_env
from tests.conftest import REPO


def test_committed_fingerprints_are_current() -> None:
    cfg = load_config(REPO)
    assert "labelme_tracking" in registered_kinds(cfg)  # optional datasets' kinds are covered too
    assert codedeps.stale(REPO, registered_kinds(cfg)) == [], "run `python -m emdata code-deps --write` and commit pipeline/code/"


def _emdata_imports(module: str) -> set[str]:
    """Every emdata module a module imports, at top level or inside functions (lazy imports too)."""
    modules = package_modules()
    return imported_modules(module, modules[module], set(modules))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_reader_a_source_imports_is_declared(kind) -> None:
    """A source that reads through emdata.formats.<x> must list it in READERS: fetch leaves undeclared
    readers out only when they are declared (``DECODES_ON_FETCH``), so an undeclared one would be guessed."""
    source = get_source(kind)
    readers = {m for m in _emdata_imports(source.__name__) if m.startswith("emdata.formats.") and m != "emdata.formats.raw"}
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


def test_normalize_depends_on_every_module_its_entry_imports() -> None:
    """The hand-kept list this replaced left out the config and the fetch machinery normalize reads through."""
    modules = set(codedeps.modules_for("epfl", "normalize"))
    for name in ("emdata.params.config", "emdata.sources.fetch.files", "emdata.sources.fetch.record",
                 "emdata.sources", "emdata.stages.normalize.write", "emdata.stages.normalize.publish",
                 "emdata.sources.epfl", "emdata.formats.tiff"):
        assert name in modules, name
    assert set(import_closure(["emdata.stages.normalize.volume"], package_modules(),
                              stop=set(codedeps.NOT_OUTPUT) | {codedeps.COLLECTION_WRITER})) <= modules


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_kind_depends_on_no_other_kinds_source(kind) -> None:
    others = {module for other, module in KINDS.items() if other != kind}
    for stage in codedeps.STAGES:
        modules = set(codedeps.modules_for(kind, stage))
        assert KINDS[kind] in modules and not modules & others, (stage, sorted(modules & others))
        assert not modules & set(codedeps.NOT_OUTPUT)


def test_the_exclusions_name_real_modules_and_the_layout_rule_holds() -> None:
    assert set(codedeps.NOT_OUTPUT) <= set(package_modules())
    assert codedeps.COLLECTION_WRITER not in codedeps.modules_for("epfl", "normalize")
    assert codedeps.COLLECTION_WRITER in codedeps.modules_for("lightmycells", "normalize")
    assert "emdata.formats.tiff" not in codedeps.modules_for("epfl", "fetch")  # stored as served: decoded by normalize
    assert "emdata.formats.precomputed" in codedeps.modules_for("precomputed", "fetch")  # DECODES_ON_FETCH


def test_the_import_reader_follows_lazy_imports_and_skips_type_checking(tmp_path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
                                  "else:\n    import pkg.e\ndef f():\n    from pkg.sub import b\n")
    for name in ("sub/b.py", "sub/c.py", "d.py", "e.py"):
        (package / name).write_text("")
    modules = package_modules(package)
    assert imported_modules("pkg.a", modules["pkg.a"], set(modules)) == {"pkg.sub.b", "pkg.e"}
    assert import_closure(["pkg.a"], modules) == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c", "pkg.e"}
    assert import_closure(["pkg.a"], modules, stop={"pkg.sub"}) == {"pkg", "pkg.a", "pkg.sub.b", "pkg.e"}


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
