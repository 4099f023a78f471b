"""A source kind defined only here, registered from this test alone, runs the whole DVC pipeline.

The kind "toy" serves a generated volume as ``volume.npy`` plus ``info.json`` (its voxel size and
offset) over loopback HTTP. Its module and replica are written into a temporary folder with a
``.dist-info`` whose entry points register them (groups ``emdata.sources`` and
``emdata.replicas``), exactly as an installed plug-in package would: no package code changes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import textwrap
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from emdata.testing.demo import copy_repository, point_params_at_replicas, start_replicas
from emdata.core.digest import sha256_file
from emdata.testing.dvc import dvc, git, offline_env
from tests.conftest import REPO

TOY_SOURCE = '''
"""A toy source: a .npy volume and its geometry in info.json, over HTTP (test plug-in)."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emdata.params.schema import Section, as_url
from emdata.formats.raw import ArrayVolume
from emdata.sources.fetch.files import RemoteFile, fetch_files, plan_files

KIND = "toy"
READERS = ()


@dataclass(frozen=True)
class Params:
    base_url: str

    @property
    def files(self):
        return [RemoteFile(n, self.base_url + n) for n in ("volume.npy", "info.json")]

    def to_dict(self):
        return {"kind": KIND, "base_url": self.base_url}


def parse_params(sec: Section) -> Params:
    return Params(sec.required("base_url", as_url))


def plan(params, ctx):
    return plan_files(ctx, params.files)


def fetch(params, ctx):
    return ctx.record(fetch_files(ctx, params.files))


def open_volume(params, raw: Path, dataset: str):
    info = json.loads((raw / "info.json").read_text())
    return ArrayVolume(np.load(raw / "volume.npy", mmap_mode="r"), dataset,
                       voxel_size_nm=tuple(info["voxel_size_nm"]), offset_nm=tuple(info["offset_nm"]))


def read_metadata(params, raw: Path, dataset: str):
    return {"info": json.loads((raw / "info.json").read_text())}


def describe(params, raw: Path, dataset: str):
    return {"instrument": "toy scope", "slices": int(np.load(raw / "volume.npy", mmap_mode="r").shape[0])}
'''

TOY_REPLICA = '''
"""The toy source's replica: writes the two files and serves them on loopback (test plug-in)."""
import json
from contextlib import contextmanager

import numpy as np

from emdata.testing.http_server import ReplicaServer
from emdata.testing.registry import ReplicaCase
from emdata.testing.volumes import coordinate_volume

VOXEL, OFFSET = (29.5, 4.25, 4.25), (100.0, -50.0, 7.0)


class Running:
    def __init__(self, server, array):
        self.server, self.array = server, array

    def cases(self):
        entry = {"title": "toy", "license": "CC0", "citation": "none", "modality": "synthetic",
                 "source": {"kind": "toy", "base_url": self.server.url + "/toy/"}}
        return [ReplicaCase("toy_set", entry, {"raw": self.array}, VOXEL, OFFSET, "/toy/volume.npy")]

    def point(self, key, dataset):
        return {**dataset, "source": {**dataset["source"], "base_url": self.server.url + "/toy/"}}


class ToyReplica:
    kind, transport = "toy", "http"
    case_keys = ("toy_set",)

    @contextmanager
    def start(self, root, *, coordinate=True):
        array = coordinate_volume((13, 22, 31), np.uint16)
        (root / "toy").mkdir(parents=True)
        np.save(root / "toy" / "volume.npy", array)
        (root / "toy" / "info.json").write_text(json.dumps({"voxel_size_nm": VOXEL, "offset_nm": OFFSET}))
        with ReplicaServer(root) as server:
            yield Running(server, array)


REPLICA = ToyReplica()
'''


@pytest.fixture
def toy_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the toy kind as a plug-in would be: modules plus a .dist-info with entry points."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "emdata_toy_source.py").write_text(textwrap.dedent(TOY_SOURCE))
    (site / "emdata_toy_replica.py").write_text(textwrap.dedent(TOY_REPLICA))
    info = site / "emdata_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: emdata-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[emdata.sources]\ntoy = emdata_toy_source\n\n"
                                          "[emdata.replicas]\ntoy = emdata_toy_replica:REPLICA\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


@pytest.mark.dvc
@pytest.mark.s3
def test_a_source_registered_from_a_test_runs_repro_push_and_pull(toy_plugin: Path, tmp_path: Path) -> None:
    from emdata.testing.s3 import SeaweedS3

    env = offline_env(tmp_path / "env")
    # the dvc stages' `python -m emdata` find the plug-in too (and the emdata under test, if on the path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(toy_plugin), os.environ.get("PYTHONPATH", "")) if p)
    repo = tmp_path / "producer"
    copy_repository(REPO, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    with ExitStack() as stack:
        running = start_replicas({"toy"}, tmp_path / "replicas", stack)
        case = running["toy"].cases()[0]
        params["datasets"] = {case.key: case.dataset}  # no voxel size in params: the source reports it
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        point_params_at_replicas(repo / "params.yaml", running)
        s3 = stack.enter_context(SeaweedS3(tmp_path / "s3", access_key=env["AWS_ACCESS_KEY_ID"],
                                           secret_key=env["AWS_SECRET_ACCESS_KEY"]))
        s3.create_bucket("emdata-dvc")
        from emdata.testing.dvc import run

        run([sys.executable, "-m", "emdata", "code-deps", "--write"], repo, env)
        assert (repo / "pipeline" / "code" / "toy-normalize.json").is_file()
        git(["init", "-q", "-b", "main"], repo, env)
        git(["add", "-A"], repo, env)
        git(["commit", "-qm", "toy dataset"], repo, env)
        dvc(["remote", "modify", "--local", "s3", "endpointurl", s3.endpoint], repo, env)
        dvc(["repro"], repo, env)
        assert re.findall(r"Running stage '([^']+)'", dvc(["repro"], repo, env)) == ["inputs"]
        dvc(["push", "-r", "s3"], repo, env)
        git(["add", "-A"], repo, env)
        git(["commit", "-qm", "outputs"], repo, env)
        h5 = repo / "data" / "processed" / "toy_set.h5"
        with h5py.File(h5, "r") as f:
            np.testing.assert_array_equal(f["raw"][()], case.expected["raw"])
            np.testing.assert_allclose(f["raw"].attrs["resolution"], case.voxel_size_nm)
            np.testing.assert_allclose(f["raw"].attrs["offset"], case.offset_nm)
        record = json.loads((repo / "data" / "metadata" / "toy_set.json").read_text())
        assert record["description"] == {"instrument": "toy scope", "slices": case.expected["raw"].shape[0]}
        clone = tmp_path / "clone"
        git(["clone", "-q", str(repo), str(clone)], tmp_path, env)
        dvc(["remote", "modify", "--local", "s3", "endpointurl", s3.endpoint], clone, env)
        dvc(["pull", "-r", "s3"], clone, env)
        assert sha256_file(clone / "data" / "processed" / "toy_set.h5") == sha256_file(h5)
