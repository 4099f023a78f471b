"""The public read API as users and type checkers see it: ``import emdata``, nothing else."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import emdata

PACKAGE = Path(emdata.__file__).parent
ROOT = PACKAGE.parents[1]


def _type_checking_imports() -> dict[str, str]:
    """``name -> module`` of the ``if TYPE_CHECKING:`` re-exports in ``emdata/__init__.py``."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{alias.name}: a re-export needs 'as {alias.name}'"
                    found[alias.name] = imp.module
    return found


def test_the_lazy_names_are_the_typed_names() -> None:
    """Every lazily loaded name has a re-export type checkers see, from the module it is loaded from."""
    assert _type_checking_imports() == emdata._LAZY
    for name, module in emdata._LAZY.items():
        assert getattr(emdata, name) is getattr(importlib.import_module(module), name)
    assert (PACKAGE / "py.typed").is_file()
    assert 'emdata = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()  # installed with the package


def test_the_front_door_is_for_reading_data() -> None:
    assert "load_config" not in emdata.__all__
    with pytest.raises(AttributeError, match="no attribute 'load_config'"):
        emdata.load_config  # noqa: B018 - the configuration lives in emdata.params.config


def test_import_emdata_loads_no_reader() -> None:
    code = "import sys, emdata; print(sorted(m for m in sys.modules if m.startswith(('emdata.', 'h5py'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_renamed_attributes_warn_and_keep_their_meaning(tmp_path) -> None:
    from emdata.testing.volumes import write_canonical

    vol = emdata.Volume(write_canonical(tmp_path / "v.h5", np.zeros((8, 8, 8), np.uint8)))
    for sampler in (emdata.RandomPatches(vol, (2, 3, 4)), emdata.GridPatches(vol, (2, 3, 4))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sampler.patch == sampler.patch_shape == (2, 3, 4)
        assert [w.category for w in caught] == [DeprecationWarning]
        assert ".patch is deprecated, use .patch_shape" in str(caught[0].message)


SNIPPET = """
import emdata
reveal_type(emdata.open_dataset)
reveal_type(emdata.open_dataset("x").read((0, 0, 0), (1, 1, 1)))
reveal_type(emdata.RandomPatches)
reveal_type(emdata.run_tiled)
reveal_type(emdata.open_collection)
"""


def test_type_checkers_see_the_public_api(tmp_path) -> None:
    """``reveal_type(emdata.open_dataset)`` is its signature under mypy, not ``Any``."""
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    out, err, _ = api.run(["--no-error-summary", "--config-file", str(ROOT / "pyproject.toml"), str(snippet)])
    revealed = [line.split("Revealed type is ", 1)[1] for line in out.splitlines() if "Revealed type is" in line]
    assert len(revealed) == 5, out + err
    assert "-> emdata.access.volume.Volume" in revealed[0]
    assert revealed[1].startswith('"numpy.ndarray')
    assert "emdata.access.sampling.RandomPatches" in revealed[2]
    assert "-> pathlib.Path" in revealed[3] and "-> emdata.access.collection.Collection" in revealed[4]
    assert not any(r == '"Any"' for r in revealed)


def test_a_raw_volume_reads_between_start_and_stop_and_its_old_name_warns() -> None:
    """``RawVolume.read(start, stop)`` was the same verb as ``Volume.read(start, shape)`` with another
    meaning: it is ``read_between`` now, and the old name still means start and stop."""
    from emdata.formats.raw import ArrayVolume

    data = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    vol = ArrayVolume(data)
    np.testing.assert_array_equal(vol.read_between((1, 2, 3), (3, 4, 6)), data[1:3, 2:4, 3:6])
    with pytest.warns(DeprecationWarning, match=r"use read_between\(start, stop\)"):
        np.testing.assert_array_equal(vol.read((1, 2, 3), (3, 4, 6)), data[1:3, 2:4, 3:6])
