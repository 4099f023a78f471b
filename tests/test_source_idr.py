"""IDR specifics: both pixel routes, OMERO's answers, the ImageJ TIFF, one-line errors.

The shared contract runs the original route of ``idr0086_u2os`` in test_contract.py; here the
contract also runs for the render route and for a file whose name has a ``+``.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from emdata.params.config import Config, load_config
from emdata.sources.dataset import resolve_dataset
from emdata.errors import ConfigError, FetchError, FormatError
from emdata.core.digest import sha256_file
from emdata.testing.contract import FAST_RETRIES, CoreContract, HttpContract, SourceCase
from emdata.testing.idr import (
    DATASET_ID,
    FOLDER,
    HELA_ID,
    HELA_PLUS,
    IMAGE_ID,
    REPLICA,
    U2OS_XY,
    RunningIdr,
    idr_entry,
    imagej_description,
    write_imagej_tiff,
)
from tests.conftest import REPO

KEY = "idr0086_u2os"
TILE = 16  # small tiles on the 7 × 23 × 37 replica volume: 2 × 3 tiles per plane, edge tiles partial


@pytest.fixture
def idr(tmp_path: Path):
    with REPLICA.start(tmp_path / "replica") as running:
        yield running


def project(tmp_path: Path, entries: dict[str, Any], name: str = "project") -> Config:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"normalize": {"chunks": [8, 16, 16]}, "datasets": entries}))
    return load_config(root)


def fetch(cfg: Config, key: str = KEY):
    from emdata.stages.fetch import fetch_dataset

    return fetch_dataset(cfg, key, http_factory=lambda: client_for_key(key))


def client_for_key(key: str):
    from emdata.transport.client import HttpClient

    return HttpClient(key, policy=FAST_RETRIES, sleep=lambda s: None, seed=0)


def normalize(cfg: Config, key: str = KEY) -> Path:
    from emdata.stages.normalize.volume import normalize_dataset

    return normalize_dataset(cfg, key)


# -- acceptance 1: the contract, for the render route and for a '+' in a file name -----------------


def _case(running: RunningIdr, tmp_path: Path, entry: dict[str, Any], voxel: float, fault_path: str,
          expected: np.ndarray) -> SourceCase:
    cfg = project(tmp_path, {KEY: entry})
    rel = entry["source"]["original"]["file"]
    return SourceCase(cfg=cfg, key=KEY, server=running.server, expected={"raw": expected}, big_file=fault_path,
                      reload=lambda: load_config(cfg.root), voxel_size_nm=(voxel,) * 3, offset_nm=(0.0,) * 3,
                      files={rel: fault_path})


class TestRenderRouteContract(CoreContract):
    @pytest.fixture
    def case(self, idr, tmp_path):
        img = idr.replica.images[IMAGE_ID]
        entry = idr_entry(idr.server.url, pixels="render", tile_size=TILE)
        return _case(idr, tmp_path, entry, 20.0, img.file, img.array)


class TestPlusInFileNameContract(CoreContract, HttpContract):
    """idr0086's HeLa file ``Figure_S3F+1F_...``: a literal '+' in the path, never turned into a space."""

    @pytest.fixture
    def case(self, idr, tmp_path):
        img = idr.replica.images[HELA_ID]
        assert img.name == HELA_PLUS and "+" in img.file
        return _case(idr, tmp_path, idr_entry(idr.server.url, HELA_ID), 4.0, img.file, img.array)


# -- the real params --------------------------------------------------------------------------------


def test_real_params_use_the_real_idr_and_ebi_urls() -> None:
    from emdata.sources.idr import tiles

    src = resolve_dataset(load_config(REPO), KEY).source
    assert src.image_url == "https://idr.openmicroscopy.org/api/v0/m/images/9846137/"
    assert src.imgdata_url == "https://idr.openmicroscopy.org/webclient/imgData/9846137/"
    assert src.original.url == ("https://ftp.ebi.ac.uk/pub/databases/IDR/idr0086-miron-micrographs/20200610-ftp/"
                                "experimentD/Miron_FIB-SEM/Miron_FIB-SEM_processed/"
                                "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif")
    assert (src.dataset_id, src.pixels, src.paper_doi) == (10740, "original", "10.1126/sciadv.aba8811")
    # 278-byte header, 184 strips of 775 × 1121, 183 IFDs of 162 bytes (SOURCES.md §5.3)
    assert src.original.size == 278 + 184 * 775 * 1121 + 183 * 162
    first = tiles(src, (184, 775, 1121))[0]
    assert first.url == ("https://idr.openmicroscopy.org/webgateway/render_image_region/9846137/0/0/"
                              f"?region=0,0,{min(src.tile_size, 1121)},{min(src.tile_size, 775)}"
                              "&c=1%7C0:255$FFFFFF&m=g&format=png&q=1"
                              "&maps=%5B%7B%22inverted%22:%7B%22enabled%22:false%7D%7D%5D")
    ds = resolve_dataset(load_config(REPO), KEY)
    assert ds.license.startswith("CC BY 4.0") and ds.doi == "10.17867/10000141" and ds.voxel_size_nm is None


def test_paper_doi_and_geometry_trust_are_not_part_of_the_fetch_spec(idr, tmp_path) -> None:
    from emdata.sources.idr import parse_params
    from emdata.params.schema import Section

    entry = {k: v for k, v in idr_entry(idr.server.url)["source"].items() if k != "kind"}
    plain = parse_params(Section({**entry, "paper_doi": None}, "s")).to_dict()
    cfg = project(tmp_path, {KEY: {**idr_entry(idr.server.url), "geometry_trust": "imagej"}})
    trusting = resolve_dataset(cfg, KEY).source
    assert trusting.geometry_trust == "imagej" and trusting.to_dict() == plain
    assert "render" not in plain and plain["original"]["name"] == U2OS_XY
    render = parse_params(Section({**entry, "pixels": "render"}, "s")).to_dict()
    assert render["render"] == {"tile_size": 512} and "original" not in render


# -- the replica's TIFF is the real file's structure ----------------------------------------------------


def test_replica_tiff_has_the_real_imagej_layout(tmp_path) -> None:
    import tifffile

    # The real file: description of 92 bytes (with ImageJ's trailing newline and NUL), first strip at 278.
    assert 8 + 162 + len(imagej_description(184, 0.02, 36.0, 199.0)) + 16 == 278
    vol = np.arange(5 * 9 * 13, dtype=np.uint8).reshape(5, 9, 13)
    path = write_imagej_tiff(tmp_path / "a.tif", vol)
    data = path.read_bytes()
    assert data[:4] == b"MM\x00\x2a" and struct.unpack(">I", data[4:8])[0] == 8
    first = 8 + 162 + len(imagej_description(5, 0.02, 36.0, 199.0)) + 16
    end = first + vol.size
    assert struct.unpack(">I", data[8 + 2 + 13 * 12:8 + 2 + 13 * 12 + 4])[0] == end  # IFD 1 after the pixels
    assert len(data) == end + 4 * 162
    with tifffile.TiffFile(path) as tif:
        assert tif.byteorder == ">" and tif.is_imagej and not tif.is_bigtiff
        for i, page in enumerate(tif.pages):
            tags = {t.name: t.value for t in page.tags.values()}
            assert tags["StripOffsets"] == (first + i * 9 * 13,) and tags["StripByteCounts"] == (9 * 13,)
            assert tags["XResolution"] == tags["YResolution"] == (50000000, 1000000)
            assert tags["RowsPerStrip"] == 9 and tags["ResolutionUnit"] == 1 and tags["PhotometricInterpretation"] == 1
            assert tags["ImageDescription"] == ("ImageJ=1.52p\nimages=5\nslices=5\nunit=\\u00B5m\nspacing=0.02\n"
                                                "loop=false\nmin=36.0\nmax=199.0")
        np.testing.assert_array_equal(tif.asarray(), vol)


def test_imagej_calibration_decodes_the_micro_escape(tmp_path) -> None:
    from emdata.formats.imagej import decode_escapes, imagej_info, voxel_size_nm

    assert decode_escapes("\\u00B5m") == "µm" == decode_escapes("\u03bcm")
    vol = np.zeros((3, 5, 7), np.uint8)
    info = imagej_info(write_imagej_tiff(tmp_path / "a.tif", vol, pixel_um=0.008, spacing_um=0.05), "t")
    assert info["unit"] == "µm" and info["imagej"]["unit"] == "\\u00B5m"
    np.testing.assert_allclose(voxel_size_nm(info), (50.0, 8.0, 8.0))
    # A plain TIFF's 72 dpi is no calibration; ImageJ's "micron" is.
    assert voxel_size_nm({"imagej": {}, "XResolution": [72, 1], "YResolution": [72, 1], "ResolutionUnit": 2}) is None
    plain = {"imagej": {"spacing": 0.1}, "unit": "micron", "XResolution": [4, 1], "YResolution": [4, 1]}
    np.testing.assert_allclose(voxel_size_nm(plain), (100.0, 250.0, 250.0))


# -- what OMERO answers -----------------------------------------------------------------------------


def test_fetch_keeps_omero_answers_and_describes_names(idr, tmp_path) -> None:
    import h5py

    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url)})
    fetch(cfg)
    raw = cfg.raw_dir(KEY)
    assert {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()} == {
        U2OS_XY, "omero/image.json", "omero/imgData.json", "omero/dataset.json", "source.json"}
    with h5py.File(normalize(cfg)) as f:
        np.testing.assert_array_equal(f["raw"][()], idr.replica.images[IMAGE_ID].array)
        assert list(f["raw"].attrs["resolution"]) == [20.0, 20.0, 20.0]
        description = json.loads(f.attrs["description"])
        native = json.loads(f["provenance/native_metadata"][()])
        assert (f.attrs["license"], f.attrs["doi"]) == ("CC BY 4.0", "10.17867/10000141")
    assert description["image_name"] == U2OS_XY and description["dataset_name"] == "U2OS_chromatin"
    assert description["project_name"] == "idr0086-miron-micrographs/experimentD"
    assert description["study_name"] == "idr0086-miron-micrographs"
    assert description["paper_doi"] == "10.1126/sciadv.aba8811"
    assert description["voxel_size_from"] == "omero (ImageJ tags agree)"
    assert native["omero"]["image"]["data"]["Pixels"]["PhysicalSizeX"]["Symbol"] == "µm"
    assert native["omero"]["imgData"]["meta"]["datasetId"] == DATASET_ID
    tiff = native["tiff"][U2OS_XY]
    assert tiff["byteorder"] == ">" and tiff["unit"] == "µm" and tiff["XResolution"] == [50000000, 1000000]
    assert tiff["imagej"]["spacing"] == 0.02
    record = json.loads(cfg.record_path(KEY).read_text())
    assert record["description"] == description and record["license"] == "CC BY 4.0"


def test_image_data_as_a_one_element_list_is_accepted(idr, tmp_path) -> None:
    import h5py

    img = idr.replica.images[IMAGE_ID]
    body = json.dumps({"data": [idr.replica.image_json(img)]}).encode()
    idr.server.route(rf"/api/v0/m/images/{IMAGE_ID}/", lambda m, q: (200, body, "application/json"))
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url)})
    fetch(cfg)
    with h5py.File(normalize(cfg)) as f:
        np.testing.assert_array_equal(f["raw"][()], img.array)


def test_dataset_images_are_paged_as_meta_says(idr, tmp_path) -> None:
    idr.replica.max_limit = 1  # the server caps limit: two images, two pages
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url)})
    fetch(cfg)
    pages = [r for r in idr.server.requests if r.path == f"/api/v0/m/datasets/{DATASET_ID}/images/"]
    assert [r.query for r in pages] == ["limit=500&offset=0", "limit=500&offset=1"]
    listing = json.loads((cfg.raw_dir(KEY) / "omero" / "dataset.json").read_text())
    assert [i["@id"] for i in listing["images"]] == [IMAGE_ID, IMAGE_ID + 1]


def test_an_image_outside_its_dataset_is_refused(idr, tmp_path) -> None:
    entry = idr_entry(idr.server.url)
    entry["source"]["dataset_id"] = 10739  # HeLa_chromatin
    cfg = project(tmp_path, {KEY: entry})
    with pytest.raises(FormatError, match=r"image 9846137 is not in dataset 10739 \(its 1 images: 9846139\)"):
        fetch(cfg)


def test_file_names_with_spaces_and_plus_are_encoded(idr, tmp_path) -> None:
    name = "U2OS copy+1 (xy).tif"
    served = idr.server.add_file(FOLDER + name, (idr.server.root / FOLDER.lstrip("/") / U2OS_XY).read_bytes())
    entry = idr_entry(idr.server.url)
    entry["source"]["original"]["file"] = name
    cfg = project(tmp_path, {KEY: entry})
    fetch(cfg)
    record = json.loads((cfg.raw_dir(KEY) / "source.json").read_text())
    assert record["files"][name]["url"].endswith("/U2OS%20copy%2B1%20%28xy%29.tif")
    assert (cfg.raw_dir(KEY) / name).read_bytes() == served.read_bytes()
    assert [r.path for r in idr.server.requests if r.method == "GET" and r.path.endswith(".tif")] == [FOLDER + name]


def test_omero_and_imagej_voxel_sizes_must_agree_unless_geometry_trust_chooses(idr, tmp_path) -> None:
    import h5py

    pixels = idr.replica.images[IMAGE_ID].pixels_override
    pixels["PhysicalSizeX"] = {"@type": "TBD#LengthI", "Unit": "NANOMETER", "Symbol": "nm", "Value": 30.0}
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url)})
    fetch(cfg)
    with pytest.raises(FormatError) as err:
        normalize(cfg)
    text = str(err.value)
    assert "\n" not in text and "OMERO says [20, 20, 30] nm but ImageJ tags say [20, 20, 20] nm" in text
    assert f"set datasets.{KEY}.geometry_trust to omero or imagej" in text
    for choice, expected in (("omero", [20.0, 20.0, 30.0]), ("imagej", [20.0, 20.0, 20.0])):
        cfg = project(tmp_path, {KEY: {**idr_entry(idr.server.url), "geometry_trust": choice}})
        assert fetch(cfg).up_to_date  # not part of the fetch spec: nothing is fetched again
        with h5py.File(normalize(cfg)) as f:
            assert list(f["raw"].attrs["resolution"]) == expected
            assert json.loads(f.attrs["description"])["voxel_size_from"] == \
                f"{choice} ({'ImageJ tags differ' if choice == 'omero' else 'OMERO differs'}, geometry_trust: {choice})"
    # params' voxel size, trusted, overrides both (the source's own disagreement no longer matters)
    entry = {**idr_entry(idr.server.url), "geometry_trust": "params", "voxel_size_nm": [20.0, 20.0, 25.0]}
    with h5py.File(normalize(project(tmp_path, {KEY: entry}))) as f:
        assert list(f["raw"].attrs["resolution"]) == [20.0, 20.0, 25.0]


@pytest.mark.parametrize("value", ["imagej", None])
def test_the_old_geometry_from_key_is_refused_with_the_new_one(idr, tmp_path, value) -> None:
    entry = idr_entry(idr.server.url)
    entry["source"]["geometry_from"] = value
    with pytest.raises(ConfigError) as err:
        resolve_dataset(project(tmp_path, {KEY: entry}), KEY)
    text = str(err.value)
    assert "\n" not in text and f"datasets.{KEY}.source.geometry_from: replaced by datasets.{KEY}.geometry_trust" in text
    assert ("`geometry_trust: imagej`" if value else "`geometry_trust`") in text
    assert "params, source, omero, imagej" in text


def test_voxel_size_choice_without_spacing_and_without_omero_sizes() -> None:
    from emdata.formats.omero import Pixels, voxel_size

    tags = {"unit": "nm", "YResolution": [1, 20], "XResolution": [1, 20], "imagej": {}}  # no spacing: no z
    with_omero = Pixels((2, 3, 4), 1, 1, "uint8", (30.0, 20.0, 20.1))
    assert voxel_size(with_omero, tags, None, "d", "f") == ((30.0, 20.0, 20.1), "omero (ImageJ tags agree)")
    assert voxel_size(with_omero, tags, "imagej", "d", "f") == ((30.0, 20.0, 20.1), "omero (ImageJ tags agree)")
    assert voxel_size(Pixels((2, 3, 4), 1, 1, "uint8", None), tags, None, "d", "f") == (None, "none")
    full = {**tags, "imagej": {"spacing": 30}}
    assert voxel_size(Pixels((2, 3, 4), 1, 1, "uint8", None), full, None, "d", "f") == \
        ((30.0, 20.0, 20.0), "imagej (OMERO has none)")
    assert voxel_size(with_omero, None, None, "d", "f") == ((30.0, 20.0, 20.1), "omero")


# -- the render route ------------------------------------------------------------------------------


def test_both_routes_give_byte_identical_raw(idr, tmp_path) -> None:
    import h5py

    entries = {"orig": idr_entry(idr.server.url), "rend": idr_entry(idr.server.url, pixels="render", tile_size=TILE)}
    cfg = project(tmp_path, entries)
    out = {}
    for key in entries:
        fetch(cfg, key)
        with h5py.File(normalize(cfg, key)) as f:
            out[key] = (f["raw"][()], f["raw"].attrs["array_sha256"], list(f["raw"].attrs["resolution"]))
    np.testing.assert_array_equal(out["orig"][0], out["rend"][0])
    assert out["orig"][1:] == out["rend"][1:]
    rendered = sorted(p.name for p in (cfg.raw_dir("rend") / "render").rglob("*.png"))
    assert len(rendered) == 7 * 2 * 3  # z planes × tile rows × tile columns
    assert "y00016_x00032.png" in rendered  # the 7 × 5 corner tile


def test_render_route_refuses_non_uint8_before_asking_for_tiles(idr, tmp_path) -> None:
    idr.replica.images[IMAGE_ID].pixels_override["Type"] = {"@type": "TBD#PixelsType", "value": "uint16"}
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url, pixels="render", tile_size=TILE)})
    with pytest.raises(FormatError, match="is uint16; rendered planes are 8-bit.*use pixels: original"):
        fetch(cfg)
    assert not [r for r in idr.server.requests if "render_image_region" in r.path]


def test_render_route_refuses_jpeg_tiles(idr, tmp_path) -> None:
    """Plain OMERO.web answers JPEG whatever ``format`` says: lossy, so refused, naming the URL."""
    original = idr.replica.render_region

    def jpeg(match, query):
        return original(match, {**query, "format": ["jpeg"]})

    idr.server.route(r"/webgateway/render_image_region/(\d+)/(\d+)/(\d+)/", jpeg)
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url, pixels="render", tile_size=TILE)})
    with pytest.raises(FormatError, match=r"render_image_region/9846137/\d+/0/\?region=.*the answer is JPEG"):
        fetch(cfg)
    assert not cfg.raw_dir(KEY).exists()


def test_render_route_resumes_tile_by_tile_and_stops_after_a_failed_tile(idr, tmp_path, monkeypatch) -> None:
    import threading
    from collections import Counter

    import h5py
    from emdata.transport.client import HttpClient

    workers, attempts = 4, FAST_RETRIES.attempts
    monkeypatch.setenv("EMDATA_FETCH_WORKERS", str(workers))
    cancels: list[threading.Event] = []  # the fetch's cancel signal, as the render route hands it to get_bytes

    class Client(HttpClient):
        def get_bytes(self, url: str, **kwargs: Any) -> bytes:
            if kwargs.get("cancel") is not None:
                cancels.append(kwargs["cancel"])
            return super().get_bytes(url, **kwargs)

    # Plane 5 never renders. Its first tile is answered only once every other worker is inside a
    # plane-5 tile, and those only once the fetch has given up on the first: every worker is busy
    # with plane 5 when a tile fails for good, whatever the thread timing (the waits end at once
    # in a correct run; their timeout only keeps a broken one from hanging).
    broken = f"/webgateway/render_image_region/{IMAGE_ID}/5/0/"
    lock, others, all_in = threading.Lock(), [0], threading.Event()

    def plane5(match: Any, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        if query["region"][0].startswith("0,0,"):
            all_in.wait(60)
        else:
            with lock:
                others[0] += 1
                if others[0] == workers - 1:
                    all_in.set()
            if cancels:
                cancels[0].wait(60)
        return 500, b"cannot render this plane\n", "text/plain"

    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url, pixels="render", tile_size=TILE)})
    idr.server.route(broken, plane5)
    from emdata.stages.fetch import fetch_dataset

    with pytest.raises(FetchError, match=rf"{KEY}: .*{broken}\?region=.*failed after {attempts} attempts") as failed:
        fetch_dataset(cfg, KEY, http_factory=lambda: Client(KEY, policy=FAST_RETRIES, sleep=lambda s: None, seed=0))
    tiles = [r for r in idr.server.requests if "render_image_region" in r.path]
    plane = Counter(r.query.split("&")[0] for r in tiles if r.path == broken)
    # Planes 0-4 once per tile; the failed tile's attempts; one request from each other worker (the
    # one in flight when the tile failed) and none from a tile that had not started.
    assert sorted(plane.values()) == [1] * (workers - 1) + [attempts]
    assert len(tiles) == 30 + attempts + (workers - 1)
    assert f"{broken}?region=0,0," in str(failed.value)  # the tile that failed is the one reported
    assert not cfg.raw_dir(KEY).exists()
    kept = set(p.relative_to(cfg.partial_dir(KEY)).as_posix() for p in cfg.partial_dir(KEY).rglob("*.png"))
    assert len(kept) == 30 and not any(p.startswith("render/z00005/") for p in kept)
    idr.server.routes.pop(0)  # plane 5 renders again
    idr.server.clear_log()
    fetch(cfg)
    again = [r for r in idr.server.requests if "render_image_region" in r.path]
    assert len(again) == 42 - len(kept)  # only the missing tiles
    with h5py.File(normalize(cfg)) as f:
        np.testing.assert_array_equal(f["raw"][()], idr.replica.images[IMAGE_ID].array)


def test_plan_counts_tiles_without_fetching_them(idr, tmp_path) -> None:
    from emdata.stages.fetch import plan_dataset

    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url, pixels="render", tile_size=TILE)})
    plans = plan_dataset(cfg, KEY)
    assert plans[-1].name == "render/ (42 PNG tiles)" and plans[-1].requests == 42 and plans[-1].state == "new"
    assert not [r for r in idr.server.requests if "render_image_region" in r.path]


# -- acceptance 3: one-line errors, non-zero exit, existing outputs untouched -----------------------------


def emdata(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emdata", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def _outputs(cfg: Config) -> dict[str, str]:
    roots = [cfg.raw_dir(KEY), cfg.processed_path(KEY).parent, cfg.record_path(KEY).parent]
    return {str(p): sha256_file(p) for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _set_source(cfg: Config, **changes: Any) -> None:
    path = cfg.root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["datasets"][KEY]["source"].update(changes)
    path.write_text(yaml.safe_dump(params))


def _fails_in_one_line(cfg: Config, server_url: str, *needles: str) -> str:
    before = _outputs(cfg)
    proc = emdata(cfg.root, "fetch", KEY)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    # The error is one line, the last; before it only our log lines (progress, "retry n/5"), no traceback.
    errors = [i for i, text in enumerate(lines) if text.startswith("emdata: error: ")]
    assert errors == [len(lines) - 1], proc.stderr
    assert all(text.startswith(f"emdata: {KEY}: ") and ("% " in text + " " or "; retry " in text)
               for text in lines[:-1]), proc.stderr
    line = lines[-1]
    assert line.startswith(f"emdata: error: {KEY}: {server_url}/"), line
    for needle in needles:
        assert needle in line, line
    assert _outputs(cfg) == before  # the earlier fetch and its HDF5 are untouched
    return line


@pytest.fixture
def built(idr, tmp_path):
    """idr0086_u2os fetched and normalized by the render route (so the original route fetches anew)."""
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url, pixels="render", tile_size=TILE)})
    fetch(cfg)
    normalize(cfg)
    _set_source(cfg, pixels="original")
    return cfg


def test_unknown_image_id(idr, built) -> None:
    _set_source(built, image_id=123)
    _fails_in_one_line(built, idr.server.url, "/api/v0/m/images/123/", "OMERO has no image 123 (HTTP 404)")


def test_api_and_tiff_sizes_disagree(idr, built) -> None:
    idr.replica.images[IMAGE_ID].pixels_override["SizeZ"] = 8
    line = _fails_in_one_line(built, idr.server.url, "the TIFF is 7 × 23 × 37 uint8",
                              f"OMERO image {idr.server.url}/api/v0/m/images/{IMAGE_ID}/ is 8 × 23 × 37 uint8")
    assert "Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif" in line
    assert not (built.partial_dir(KEY) / U2OS_XY).exists()  # not kept for a resume


def test_truncated_tiff(idr, built) -> None:
    img = idr.replica.images[IMAGE_ID]
    idr.server.truncate(img.file, 274 + 3 * 23 * 37 + 100)  # served consistently: only the TIFF can tell
    _fails_in_one_line(built, idr.server.url, U2OS_XY, "it is truncated")


def test_html_page_where_json_is_expected(idr, built) -> None:
    page = b"<!DOCTYPE html><html><head><title>IDR maintenance</title></head><body>Back soon</body></html>"
    idr.server.route(r"/webclient/imgData/(\d+)/", lambda m, q: (200, page, "text/html"))
    _fails_in_one_line(built, idr.server.url, f"/webclient/imgData/{IMAGE_ID}/", "is not JSON",
                       "<!DOCTYPE html>")


def test_render_tile_failing_after_retries(idr, tmp_path) -> None:
    cfg = project(tmp_path, {KEY: idr_entry(idr.server.url)})
    fetch(cfg)
    normalize(cfg)
    _set_source(cfg, pixels="render", render={"tile_size": TILE})
    idr.server.fail(f"/webgateway/render_image_region/{IMAGE_ID}/2/0/", status=503, times=10_000, retry_after=0)
    _fails_in_one_line(cfg, idr.server.url, f"/webgateway/render_image_region/{IMAGE_ID}/2/0/?region=",
                       "failed after 6 attempts (HTTP 503")


# -- acceptance 2: dvc repro against the replica, both routes, summary ------------------------------------


@pytest.mark.dvc
def test_dvc_repro_builds_idr0086_by_both_routes_into_the_summary(tmp_path) -> None:
    import re
    from contextlib import ExitStack

    import h5py

    from emdata.testing.demo import replica_repository
    from emdata.testing.dvc import dvc, offline_env
    from emdata.testing.idr import TEST_SHAPE
    from emdata.testing.volumes import coordinate_volume

    env = offline_env(tmp_path / "env")
    repo = tmp_path / "work" / "producer"
    h5 = repo / "data" / "processed" / f"{KEY}.h5"
    built = {}
    with ExitStack() as stack:
        replica_repository(REPO, repo, tmp_path / "replicas", env, stack, kinds={"idr"})  # as the demo builds it
        for pixels in ("original", "render"):
            if pixels == "render":
                params = yaml.safe_load((repo / "params.yaml").read_text())
                params["datasets"][KEY]["source"].update(pixels="render", render={"tile_size": TILE})
                (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            ran = re.findall(r"Running stage '([^']+)'", dvc(["repro", f"normalize@{KEY}"], repo, env))
            assert sorted(ran) == [f"fetch@{KEY}", "inputs", f"normalize@{KEY}"]
            with h5py.File(h5, "r") as f:
                np.testing.assert_array_equal(f["raw"][()], coordinate_volume(TEST_SHAPE))
                assert list(f["raw"].attrs["resolution"]) == [20.0, 20.0, 20.0]
                assert list(f["raw"].attrs["offset"]) == [0.0, 0.0, 0.0]
                built[pixels] = (f["raw"][()].tobytes(), f["raw"].attrs["array_sha256"])
        assert built["original"] == built["render"]  # byte-identical /raw by both routes
        dvc(["repro", "summarize"], repo, env)
    record = json.loads((repo / "data" / "metadata" / f"{KEY}.json").read_text())
    assert record["license"].startswith("CC BY 4.0") and record["doi"] == "10.17867/10000141"
    assert record["description"]["paper_doi"] == "10.1126/sciadv.aba8811"
    assert record["description"]["image_name"] == U2OS_XY
    assert (record["description"]["dataset_name"], record["description"]["study_name"]) == (
        "U2OS_chromatin", "idr0086-miron-micrographs")
    assert record["native"]["omero"]["image"]["data"]["@id"] == IMAGE_ID
    summary = (repo / "METADATA_SUMMARY.md").read_text()
    assert f"| {KEY} |" in summary or f"`{KEY}`" in summary
    for view in ("xy", "xz"):
        assert (repo / "thumbnails" / f"{KEY}_{view}.png").read_bytes().startswith(b"\x89PNG")
        assert f"thumbnails/{KEY}_{view}.png" in summary
