"""Neuroglancer precomputed specifics (the shared contract runs in test_contract.py, ArrayHttpContract).

Against the loopback replica of the hemibrain EM layer (written by tensorstore): the seeded
search (reproducible, inside the bounds, in tissue by an independent check on the generated
coarse voxels, bounded), the explicit ROI, what is recorded, the plan, the one-line errors, and
the axis order checked with a decoder other than tensorstore's.
"""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from emdata.params.config import load_config
from emdata.sources.dataset import resolve_dataset
from emdata.errors import ConfigError
from emdata.sources.fetch.objects import JOURNAL
from emdata.sources.fetch.record import FetchedFile
from emdata.core.digest import sha256_file
from emdata.transport.retry import RetryPolicy
from emdata.testing.precomputed import (
    DEMO_CROP,
    FINE_OFFSET,
    LAYER_PATH,
    REPLICA,
    RunningPrecomputed,
    coarse_fraction,
    precomputed_dataset,
)
from tests.conftest import REPO

KEY = "hemibrain_em_crop"


@pytest.fixture
def running(tmp_path: Path):
    with REPLICA.start(tmp_path / "replica") as replica:
        yield replica


def project(tmp_path: Path, datasets: dict[str, Any], name: str = "project"):
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"normalize": {"chunks": [8, 16, 16]}, "datasets": datasets},
                                                     sort_keys=False))
    return load_config(root)


def emdata(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line (retry warnings may come before it; nothing else)."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("emdata: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert all("retry" in line for line in lines[:-1]), proc.stderr
    return errors[0]


def searched(running: RunningPrecomputed, seed: int, **kw: Any) -> dict[str, Any]:
    return precomputed_dataset(running.layer_url, seed=seed, **kw)


def prepared(cfg, key: str):
    from emdata.stages.fetch import fetch_context
    from emdata.sources import precomputed

    ds = resolve_dataset(cfg, key)
    return precomputed.prepare(ds.source, fetch_context(ds))


# -- params -------------------------------------------------------------------------------------


def test_real_params_name_the_public_em_layer_and_a_seeded_1000_cube() -> None:
    ds = resolve_dataset(load_config(REPO), KEY)
    src = ds.source
    assert src.url == "https://storage.googleapis.com/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg"
    assert src.scale == 8.0 and src.crop_size == (1000, 1000, 1000) and src.roi_start is None
    assert isinstance(src.seed, int) and src.tissue.min_fraction == 0.9
    assert ds.voxel_size_nm is None and ds.offset_nm is None  # the layer's info says
    assert "10.7554/eLife.57443" in (ds.doi or "") and "Scheffer" in ds.citation and ds.license


def test_params_are_checked_with_their_key_paths(tmp_path) -> None:
    base = precomputed_dataset("https://example.org/layer", seed=1)
    for change, message in [({"scale": "x"}, None), ({"scale": -8}, "source.scale"),
                            ({"crop_size": [0, 1, 1]}, "source.crop_size"), ({"seed": None}, "source.seed"),
                            ({"tissue": {"min_fraction": 1.5}}, "source.tissue.min_fraction"),
                            ({"tissue": {"max_tries": 0}}, "source.tissue.max_tries"),
                            ({"roi_start": [1, 2]}, "source.roi_start"), ({"url": "ftp://x/y"}, "source.url"),
                            ({"tissue": {"min_fractoin": 0.5}}, "source.tissue.min_fractoin: unknown key")]:
        entry = {**base, "source": {**base["source"], **change}}
        if change.get("seed", 1) is None:
            entry["source"].pop("seed")
        cfg = project(tmp_path, {"a": entry})
        if message is None:
            resolve_dataset(cfg, "a")  # a string is a scale key, checked against the info when fetching
            continue
        with pytest.raises(ConfigError, match=re.escape(f"datasets.a.{message}")):
            resolve_dataset(cfg, "a")
    gs = {**base, "source": {**base["source"], "url": "precomputed://gs://bucket/a/b/"}}
    assert resolve_dataset(project(tmp_path, {"a": gs}), "a").source.url == "https://storage.googleapis.com/bucket/a/b"


# -- the seeded search ----------------------------------------------------------------------------


def test_same_seed_same_crop_and_identical_hdf5_another_seed_another_crop(running, tmp_path) -> None:
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    hashes, rois = {}, {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        cfg = project(tmp_path, {KEY: searched(running, seed)}, name)
        fetch_dataset(cfg, KEY)
        hashes[name] = sha256_file(normalize_dataset(cfg, KEY))
        rois[name] = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())["extra"]["roi"]["start_zyx"]
    assert rois["a"] == rois["b"] and hashes["a"] == hashes["b"]
    assert rois["c"] != rois["a"] and hashes["c"] != hashes["a"]


def test_a_fetch_counts_every_request_tensorstore_made(running, tmp_path) -> None:
    """The fetch's request count is what the server saw (the HTTP client's and tensorstore's), not 1."""
    from emdata.stages.fetch import fetch_dataset

    cfg = project(tmp_path, {KEY: searched(running, 5)})
    running.server.clear_log()
    result = fetch_dataset(cfg, KEY)
    assert result.requests == len(running.server.requests) > 10


def test_every_accepted_crop_is_inside_the_scale_and_in_tissue(running, tmp_path) -> None:
    """Checked against the generated coarse voxels, not against what the source computed."""
    datasets = {f"s{seed}": searched(running, seed) for seed in range(8)}
    cfg = project(tmp_path, datasets)
    tries, rejected = [], 0
    for key in datasets:
        p = prepared(cfg, key)
        start, stop = p.crop.start, p.crop.stop
        scale = p.scale
        assert all(o <= a and b <= o + s for a, b, o, s in zip(start, stop, scale.voxel_offset, scale.size))
        assert all((a - o) % c == 0 for a, o, c in zip(start, scale.voxel_offset, scale.chunk))  # on the chunk grid
        assert p.crop.search["screening_scale"] == "32.0x32.0x32.0"
        fraction = coarse_fraction(running.replica, "32.0x32.0x32.0", start, stop, 8.0, 32.0)
        assert fraction >= 0.9 and fraction == pytest.approx(p.crop.search["fraction"], abs=1e-6)
        for candidate in p.crop.search["candidates"][:-1]:  # the rejected ones really were below the threshold
            c_start = candidate["start_zyx"]
            c_stop = [a + n for a, n in zip(c_start, DEMO_CROP)]
            assert coarse_fraction(running.replica, "32.0x32.0x32.0", c_start, c_stop, 8.0, 32.0) < 0.9
            rejected += 1
        tries.append(p.crop.search["tries"])
    assert rejected > 0 and max(tries) > 1  # a naive random crop would often not be tissue


def test_an_impossible_criterion_is_one_error_after_the_bounded_tries(running, tmp_path) -> None:
    entry = searched(running, 1, crop=(80, 100, 120), min_fraction=0.99, max_tries=7)
    cfg = project(tmp_path, {KEY: entry})
    proc = emdata(cfg.root, "fetch", KEY)
    line = error_line(proc)
    assert f"datasets.{KEY}.source.tissue: none of 7 random [80, 100, 120] crops" in line
    assert "lower tissue.min_fraction" in line and "roi_start" in line
    coarse = {r.path for r in running.server.requests if "/64.0x64.0x64.0/" in r.path}  # 10 voxels per axis
    assert coarse and not any("/8.0x8.0x8.0/" in r.path for r in running.server.requests)
    assert not cfg.raw_dir(KEY).exists()


def test_an_explicit_roi_bypasses_the_search(running, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    start = (FINE_OFFSET[0] + 3, FINE_OFFSET[1] + 5, FINE_OFFSET[2] + 7)  # background corner: no tissue test
    cfg = project(tmp_path, {KEY: precomputed_dataset(running.layer_url, seed=None, roi_start=start, crop=(9, 10, 11))})
    fetch_dataset(cfg, KEY)
    screened = [r.path for r in running.server.requests if "/32.0x32.0x32.0/" in r.path]
    assert screened == []
    extra = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())["extra"]
    assert extra["roi"]["start_zyx"] == list(start) and extra["roi"]["chosen_by"] == "roi_start"
    assert extra["search"] is None


# -- what is recorded ---------------------------------------------------------------------------


def test_roi_seed_tries_and_info_are_in_source_json_and_the_record(running, tmp_path) -> None:
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    cfg = project(tmp_path, {KEY: searched(running, 2)})
    fetch_dataset(cfg, KEY)
    h5 = normalize_dataset(cfg, KEY)
    extra = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())["extra"]
    assert extra["layer"]["info"] == running.replica.info
    assert extra["search"]["seed"] == 2 and extra["search"]["tries"] == len(extra["search"]["candidates"])
    record = json.loads(cfg.record_path(KEY).read_text())
    assert record["native"]["precomputed"]["layer"]["info"] == running.replica.info
    assert record["native"]["precomputed"]["roi"] == extra["roi"]
    assert record["description"]["seed"] == 2 and record["description"]["tries"] == extra["search"]["tries"]
    assert record["description"]["roi_start_zyx"] == extra["roi"]["start_zyx"]
    start = extra["roi"]["start_zyx"]
    assert record["offset_nm"] == [8.0 * a for a in start] and record["voxel_size_nm"] == [8.0, 8.0, 8.0]
    assert record["shape"] == list(DEMO_CROP) and record["dtype"] == "uint8"
    # The raw folder is a zarr v2 store of blocks; the root attributes stay one entry for it.
    assert record["source_urls"] == [f"{running.layer_url}/8.0x8.0x8.0"]
    import h5py

    with h5py.File(h5) as f:
        stored = f["raw"][()]
    expected = running.replica.decoded("8.0x8.0x8.0", start, [a + n for a, n in zip(start, DEMO_CROP)])
    np.testing.assert_array_equal(stored, expected)


def test_root_attribute_lists_stay_bounded_for_many_files() -> None:
    from emdata.stages.normalize.header import MAX_SOURCE_ENTRIES, source_entries

    many = {f"s0/{i}/{j}": FetchedFile(f"https://h/bucket/s0/{i}/{j}", 10, f"{i:032x}{j:032x}")
            for i in range(300) for j in range(20)}
    entries = source_entries(many)
    assert 1 <= len(entries) <= MAX_SOURCE_ENTRIES and len(json.dumps(entries)) < 16_384
    assert list(entries) == ["https://h/bucket/s0/"]
    one_url = {f"crop.zarr/{i}": FetchedFile("https://h/l/8.0x8.0x8.0", 10, f"{i:064x}") for i in range(3000)}
    (url, digest), = source_entries(one_url).items()
    assert url == "https://h/l/8.0x8.0x8.0" and len(digest) == 64
    changed = dict(one_url, **{"crop.zarr/7": FetchedFile("https://h/l/8.0x8.0x8.0", 10, "f" * 64)})
    assert source_entries(changed)[url] != digest  # the digest covers every file
    files = {"a.tif": FetchedFile("https://h/x/a.tif", 1, "1" * 64), "b.tif": FetchedFile("https://h/x/b.tif", 1, "2" * 64)}
    assert source_entries(files) == {"https://h/x/a.tif": "1" * 64, "https://h/x/b.tif": "2" * 64}  # as before


# -- axis order, with a decoder other than tensorstore's ----------------------------------------


def test_unsharded_jpeg_crop_matches_the_chunk_files_decoded_by_pillow(running, tmp_path) -> None:
    """neuroglancer's JPEG chunk is one greyscale image whose pixels, row by row, are x fastest, then y, then z."""
    from PIL import Image

    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    key = "16.0x16.0x16.0"
    off = running.replica.offsets[key]
    start, crop = (off[0] + 9, off[1] + 11, off[2] + 21), (17, 19, 23)
    cfg = project(tmp_path, {KEY: precomputed_dataset(running.layer_url, scale=16, seed=None, roi_start=start,
                                                      crop=crop)})
    fetch_dataset(cfg, KEY)
    import h5py

    with h5py.File(normalize_dataset(cfg, KEY)) as f:
        got = f["raw"][()]
    stop = [a + n for a, n in zip(start, crop)]
    size = [s for s in reversed(running.replica.info["scales"][1]["size"])]
    canvas = np.zeros([o + s for o, s in zip(off, size)], np.uint8)  # absolute voxels, missing chunks 0
    for path in running.replica.chunk_paths(key):
        (x0, x1), (y0, y1), (z0, z1) = (tuple(map(int, r.split("-"))) for r in path.name.split("_"))
        pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
        canvas[z0:z1, y0:y1, x0:x1] = pixels.reshape(z1 - z0, y1 - y0, x1 - x0)
    np.testing.assert_array_equal(got, canvas[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]])
    assert np.count_nonzero(got) > got.size // 4


# -- plan -----------------------------------------------------------------------------------------


def test_plan_shows_scale_roi_chunks_shards_and_bytes_without_reading_voxels(running, tmp_path) -> None:
    from emdata.stages.fetch import fetch_dataset

    case = running.cases()[0]  # jpeg, sharded, explicit ROI
    cfg = project(tmp_path, {case.key: case.dataset})
    proc = emdata(cfg.root, "plan", case.key)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    roi = case.dataset["source"]["roi_start"]
    assert "8.0x8.0x8.0 (8 x 8 x 8 nm, jpeg, sharded)" in out
    assert f"ROI z {roi[0]}..{roi[0] + 29}, y {roi[1]}..{roi[1] + 37}, x {roi[2]}..{roi[2] + 45}" in out
    shards = re.search(r"(\d+) chunk\(s\) of 16x16x16 voxels \(z, y, x\) in (\d+) shard\(s\)", out)
    assert shards and "on the wire" in out and "MiB decoded" in out
    assert re.search(rf"{case.key}: \d+ file\(s\), [\d.]+ \w+ to transfer", out)
    assert {r.method for r in running.server.requests if "/8.0x8.0x8.0/" in r.path} == {"HEAD"}
    # The shards plan counts are exactly the ones the fetch then reads.
    p = prepared(cfg, case.key)
    chunks = p.scale.chunks_in(p.crop.start, p.crop.stop)
    predicted = {f"{LAYER_PATH}/8.0x8.0x8.0/{p.scale.shard_of(c)}" for c in chunks}
    assert len(chunks) == int(shards.group(1)) and len(predicted) == int(shards.group(2)) > 1
    running.server.clear_log()
    fetch_dataset(cfg, case.key)
    assert {r.path for r in running.server.requests if r.path.startswith(f"{LAYER_PATH}/8.0x8.0x8.0/")} == predicted


def test_murmurhash_shards_are_predicted_as_tensorstore_writes_them(running, tmp_path) -> None:
    from emdata.formats.precomputed import parse_info

    layer = parse_info(running.replica.info, "t", running.layer_url)
    scale = next(s for s in layer.scales if s.key == "64.0x64.0x64.0")
    assert scale.sharding["hash"] == "murmurhash3_x86_128"
    everything = scale.chunks_in(scale.voxel_offset, scale.stop)
    tissue = {scale.shard_of(pos) for pos in everything
              if np.any(_chunk_of(running, scale, pos))}  # shards that hold a non-empty chunk
    written = {p.name for p in running.replica.chunk_paths(scale.key)}
    assert written == tissue and len(written) > 1


def _chunk_of(running, scale, pos):
    array = running.replica.arrays[scale.key]
    lo = [p * c for p, c in zip(pos, scale.chunk)]
    return array[lo[0]:lo[0] + scale.chunk[0], lo[1]:lo[1] + scale.chunk[1], lo[2]:lo[2] + scale.chunk[2]]


def test_plan_after_an_interrupted_fetch_marks_finished_blocks_done(running, tmp_path) -> None:
    from emdata.errors import FetchError
    from emdata.stages.fetch import fetch_dataset, plan_dataset
    from emdata.testing.contract import FAST_RETRIES
    from emdata.transport.client import HttpClient

    case = running.cases()[0]
    cfg = project(tmp_path, {case.key: case.dataset})
    running.server.fail(case.fault_path, status=503, times=10**6)
    fast = lambda: HttpClient(case.key, policy=FAST_RETRIES)  # noqa: E731
    with pytest.raises(FetchError):
        fetch_dataset(cfg, case.key, http_factory=fast)
    running.server.faults.fail.clear()
    rows = plan_dataset(cfg, case.key, http_factory=fast)
    done = [r for r in rows if r.state == "done"]
    assert done and len(done) < len(rows) and all(r.to_transfer == 0 and r.requests == 0 for r in done)
    assert all((cfg.partial_dir(case.key) / r.name).is_file() for r in done)


def test_blocks_of_another_crop_are_not_resumed(running, tmp_path) -> None:
    """Blocks left by an interrupted fetch are kept only when they belong to the crop chosen now."""
    import h5py

    from emdata.errors import FetchError
    from emdata.transport.client import HttpClient
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset
    from emdata.testing.contract import FAST_RETRIES

    case = running.cases()[0]
    cfg = project(tmp_path, {case.key: case.dataset})
    fast = lambda: HttpClient(case.key, policy=FAST_RETRIES)  # noqa: E731
    running.server.fail(case.fault_path, status=503, times=10**6)
    with pytest.raises(FetchError):
        fetch_dataset(cfg, case.key, http_factory=fast)
    running.server.faults.fail.clear()
    partial = cfg.partial_dir(case.key)
    journal = partial / JOURNAL
    header, *lines = journal.read_text().splitlines()
    left = [p for p in (partial / "crop.zarr").iterdir() if not p.name.startswith(".")]
    assert left and len(lines) == len(left)  # every block written is journalled
    for path in left:  # stands for another crop's voxels: resuming them would show in the output
        path.write_bytes(bytes(path.stat().st_size))
    other = json.loads(header)
    other["identity"]["start_zyx"] = [0, 0, 0]  # as if another crop
    fix = [json.dumps({**json.loads(line), "sha256": sha256_file(partial / json.loads(line)["relpath"])})
           for line in lines]  # the blocks' own hashes: only the crop differs
    journal.write_text("\n".join([json.dumps(other), *fix]) + "\n")
    fetch_dataset(cfg, case.key, http_factory=fast)
    assert not (cfg.raw_dir(case.key) / JOURNAL).exists()
    with h5py.File(normalize_dataset(cfg, case.key)) as f:
        np.testing.assert_array_equal(f["raw"][()], case.expected["raw"])


# -- one-line errors ------------------------------------------------------------------------------


def _layer(running: RunningPrecomputed, name: str, info: Any) -> str:
    """Serve another layer folder next to the replica's, with this ``info``; its URL."""
    path = f"/neuroglancer-janelia-flyem-hemibrain/broken/{name}"
    running.server.add_file(f"{path}/info", info if isinstance(info, bytes) else json.dumps(info).encode())
    return running.server.url + path


@pytest.mark.parametrize("problem", ["html", "no_scales", "bad_resolution", "two_channels", "unknown_scale",
                                     "too_big", "roi_outside", "missing"])
def test_bad_layers_and_impossible_params_are_one_line_each(running, tmp_path, problem) -> None:
    info = json.loads(json.dumps(running.replica.info))
    url, change, expect = running.layer_url, {}, ""
    if problem == "html":
        url, expect = _layer(running, problem, b"<html><body>Sign in</body></html>"), "is not JSON"
    elif problem == "no_scales":
        info["scales"] = []
        url, expect = _layer(running, problem, info), "malformed precomputed info: scales is missing or empty"
    elif problem == "bad_resolution":
        info["scales"][0]["resolution"] = [8, 8]
        url, expect = _layer(running, problem, info), "scales[0].resolution [8, 8] is not three positive numbers"
    elif problem == "two_channels":
        info["num_channels"] = 2
        url, expect = _layer(running, problem, info), "the layer has 2 channels"
    elif problem == "unknown_scale":
        change, expect = {"scale": 12}, "source.scale: " + running.layer_url + "/info has no scale 12.0"
    elif problem == "too_big":
        change, expect = {"crop_size": [10, 10, 500]}, "source.crop_size: [10, 10, 500] (z, y, x) is larger than scale"
    elif problem == "roi_outside":
        change, expect = {"roi_start": [0, 0, 0]}, "source.roi_start: the crop [0, 0, 0]"
    else:
        url, expect = running.server.url + "/neuroglancer-janelia-flyem-hemibrain/nothing", "HTTP 404"
    entry = searched(running, 1)
    entry["source"].update(url=url, **change)
    cfg = project(tmp_path, {KEY: entry})
    line = error_line(emdata(cfg.root, "fetch", KEY))
    assert expect in line and KEY in line
    if problem not in ("unknown_scale", "too_big", "roi_outside"):
        assert f"{url}/info" in line
    assert not cfg.raw_dir(KEY).exists()


@pytest.mark.parametrize("where", ["closed_port", "unresolvable"])
def test_an_unreachable_base_url_fails_in_one_line_after_few_attempts(tmp_path, where) -> None:
    if where == "closed_port":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/bucket/layer"  # closed again: nothing listens
    else:
        url = "https://storage.example.invalid/neuroglancer-janelia-flyem-hemibrain/emdata/clahe_yz/jpeg"
    cfg = project(tmp_path, {KEY: precomputed_dataset(url, seed=1)})
    proc = emdata(cfg.root, "fetch", KEY, timeout=60)  # the timeout only bounds a hang
    line = error_line(proc)
    if where == "closed_port":
        found = re.search(rf"{KEY}: {re.escape(url)}/info: (failed|no answer from the host) after (\d+) attempts.*"
                          "connection refused", line)
        assert found and int(found.group(2)) <= RetryPolicy().attempts, line  # the default policy, no more
    else:  # long URLs are shortened to scheme://host/…/name by the HTTP client
        assert f"{KEY}: https://storage.example.invalid/…/info: cannot resolve host storage.example.invalid" in line


# -- pipeline: a new seed re-runs only this dataset ------------------------------------------------


@pytest.mark.dvc
def test_a_new_seed_reruns_only_this_datasets_stages(tmp_path) -> None:
    from contextlib import ExitStack

    from emdata.testing.demo import replica_repository
    from emdata.testing.dvc import dvc, offline_env

    env = offline_env(tmp_path / "env")
    repo = tmp_path / "repo"
    with ExitStack() as stack:
        keys = replica_repository(REPO, repo, tmp_path / "replicas", env, stack, kinds={"precomputed", "epfl"})
        assert KEY in keys
        params = yaml.safe_load((repo / "params.yaml").read_text())  # one other dataset is enough (and faster)
        params["datasets"] = {k: v for k, v in params["datasets"].items() if k in (KEY, "epfl_mito_train")}
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dvc(["repro"], repo, env)
        first = json.loads((repo / "data" / "raw" / KEY / "source.json").read_text())["extra"]["roi"]
        assert f"| `{KEY}` | FIB-SEM | 36 × 44 × 52 | 8 × 8 × 8 | uint8 |" in (repo / "METADATA_SUMMARY.md").read_text()
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert params["datasets"][KEY]["source"]["seed"] != 3
        # Seed 3 draws another crop of the small replica (where few chunk-grid positions are tissue,
        # seeds 1 and 2 happen to pick the same one; the real layer has ~10^8 positions).
        params["datasets"][KEY]["source"]["seed"] = 3
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        status = dvc(["status"], repo, env)
        changed = set(re.findall(r"^(\S+):\s*$", status, re.M))
        # "inputs" always shows as changed (it looks at local imports on every repro)
        assert {f"fetch@{KEY}", f"normalize@{KEY}"} <= changed <= {f"fetch@{KEY}", f"normalize@{KEY}", "summarize",
                                                                   "inputs"}
        ran = sorted(re.findall(r"Running stage '([^']+)'", dvc(["repro"], repo, env)))
        assert ran == sorted([f"fetch@{KEY}", "inputs", f"normalize@{KEY}", "summarize"])
    second = json.loads((repo / "data" / "raw" / KEY / "source.json").read_text())["extra"]["roi"]
    assert second["start_zyx"] != first["start_zyx"]


def test_summary_lists_it_before_it_is_built(tmp_path) -> None:
    """Its voxel size comes from the layer, so params have none to show yet."""
    from emdata.stages.summarize import summarize

    cfg = project(tmp_path, {KEY: precomputed_dataset("https://example.org/layer", seed=1)})
    summarize(cfg)
    text = (cfg.root / "METADATA_SUMMARY.md").read_text()
    assert f"| `{KEY}` | FIB-SEM | not built yet | from the source |" in text
