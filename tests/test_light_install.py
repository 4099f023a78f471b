"""The light install: `pip install emdata` reads datasets with numpy, h5py and hdf5plugin only.

The end-to-end test builds a wheel of this tree and installs it, offline (`--no-index`), into a
fresh venv whose only third-party packages are numpy, h5py and hdf5plugin, borrowed from the test's
own environment through a `.pth` file (a folder of symlinks to them, their .dist-info and .libs).
pip must find every requirement of the wheel there, so a pipeline dependency left among the core
ones fails the install itself. Then, in that venv, the read API runs on a file this test wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from emdata.access.versions import PIPELINE_EXTRA, fetch_version, remote_storage
from emdata.core import progress
from emdata.errors import ConfigError
from emdata.testing.volumes import blob_labels, coordinate_volume, write_canonical
from tests.conftest import REPO

READ_PACKAGES = ("numpy", "h5py", "hdf5plugin")
PIPELINE_PACKAGES = ("dvc", "dvc_s3", "numba", "requests", "typer", "tifffile", "pandas", "yaml", "tqdm", "PIL")

LIGHT_SCRIPT = r"""
import json, sys
import numpy as np
import emdata
from emdata.core import progress
from emdata.errors import ConfigError

path, project, expected_path = sys.argv[1:4]
expected = np.load(expected_path)
vol = emdata.open_dataset(path)
assert vol.shape == expected.shape, vol.shape
assert np.array_equal(vol[3:9, 10:30, 5:50], expected[3:9, 10:30, 5:50])
named = emdata.open_dataset("toy")  # by name, in the project that is the working directory
assert np.array_equal(named.labels["mito"][:], vol.labels["mito"][:])
sampler = emdata.RandomPatches(vol, (8, 16, 16), seed=0, length=10, label="mito", min_foreground=0.01)
patch = sampler[0]
z, y, x = patch.origin
assert np.array_equal(patch.raw, expected[z:z + 8, y:y + 16, x:x + 16])
progress._interactive = lambda: True  # as on a terminal: without tqdm, no bar and no error
emdata.run_tiled(vol, lambda a: a.astype("float32"), project + "/prediction.h5", block_shape=(8, 16, 16),
                 halo=(2, 2, 2))
errors = []
for kwargs in ({"rev": "v1.0"}, {"remote": "s3"}):
    try:
        emdata.open_dataset("toy", **kwargs)
    except ConfigError as exc:
        errors.append(str(exc))
from importlib.metadata import distributions
print(json.dumps({
    "emdata": emdata.__file__,
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "distributions": sorted(d.metadata["Name"].lower() for d in distributions()),
    "errors": errors,
}))
"""


def _light_venv(tmp_path: Path) -> Path:
    """A venv without pip whose site-packages sees only numpy, h5py and hdf5plugin (by a .pth)."""
    venv = tmp_path / "light"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    shared = tmp_path / "read-packages"
    shared.mkdir()
    for package in READ_PACKAGES:
        for entry in ours.iterdir():
            if entry.name == package or entry.name.startswith((f"{package}-", f"{package}.libs")):
                (shared / entry.name).symlink_to(entry)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "read-packages.pth").write_text(f"{shared}\n")
    return venv


def _wheel(tmp_path: Path) -> Path:
    """A wheel of this tree, built from a copy (the build leaves build/ and *.egg-info behind)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)], check=True, env=_clean_env())
    return next((tmp_path / "dist").glob("emdata-*.whl"))


def _clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH & co., which would show the light venv our packages."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))} | {
        "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def test_pip_install_gives_the_read_api_with_numpy_h5py_and_hdf5plugin_only(tmp_path: Path) -> None:
    venv = _light_venv(tmp_path)
    light_python = str(venv / "bin" / "python")
    # pip of this environment installs into the light venv; --no-index: every requirement of the
    # wheel must already be there (numpy, h5py, hdf5plugin), so pip fails on any other one
    subprocess.run([sys.executable, "-m", "pip", "--python", light_python, "install", "--no-index", "-q",
                    str(_wheel(tmp_path))], check=True, env=_clean_env())

    project = tmp_path / "project"
    expected = coordinate_volume((23, 41, 57), np.uint8)
    path = write_canonical(project / "data" / "processed" / "toy.h5", expected,
                           labels={"mito": blob_labels(expected.shape, seed=3)},
                           resolution=(30.0, 4.0, 4.0), offset=(0.0, 0.0, 0.0))
    (project / "params.yaml").write_text("datasets: {}\n")
    np.save(tmp_path / "expected.npy", expected)
    proc = subprocess.run([light_python, "-c", LIGHT_SCRIPT, str(path), str(project), str(tmp_path / "expected.npy")],
                          cwd=project, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])

    assert report["emdata"].startswith(str(venv)), report["emdata"]  # the installed copy, not this tree
    assert set(report["distributions"]) == {"emdata", *READ_PACKAGES}
    assert not set(report["modules"]) & set(PIPELINE_PACKAGES)
    assert (project / "prediction.h5").is_file()
    assert len(report["errors"]) == 2
    for error in report["errors"]:
        assert "\n" not in error and error.startswith("toy: ") and error.endswith(PIPELINE_EXTRA)
    cli = subprocess.run([light_python, "-m", "emdata", "list"], cwd=project, env=_clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode != 0 and cli.stderr.strip().endswith(PIPELINE_EXTRA) and len(cli.stderr.splitlines()) == 1


def test_versions_without_dvc_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("dvc", "dvc.api", "dvc.repo"):
        monkeypatch.setitem(sys.modules, module, None)  # import of it raises ModuleNotFoundError
    with pytest.raises(ConfigError, match=r"rev= or repo=\) reads versions through DVC.*emdata\[pipeline\]"):
        fetch_version("toy", rev="v1.0", repo=None, cache_dir=None)
    with pytest.raises(ConfigError, match=r"remote=\) reads versions through DVC.*emdata\[pipeline\]"):
        remote_storage("toy", remote="s3")


def test_progress_without_tqdm_logs_instead_of_failing(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(progress, "_interactive", lambda: True)
    caplog.set_level("INFO", logger="emdata")
    with progress.Progress(4, "blocks", unit="block") as bar:
        bar.update(4)
    assert bar._bar is None and "blocks: 100%" in caplog.text
