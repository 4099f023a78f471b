"""Peak memory of normalizing a large Light My Cells study (a collection of OME-TIFF planes).

Generates a study of ``--gib`` GiB of single-plane uint16 OME-TIFFs (images of 512^2 to 2048^2
pixels, three BF planes and two to four targets each, as the real studies ship them) directly as
a fetched raw folder (with a fetch record built by the package and the hash state a fetch leaves),
then runs ``python -m emdata -q normalize`` as a child process and reports its wall time, MB/s,
peak RSS (``ru_maxrss``; anonymous and file-backed parts sampled from /proc) and CPU. The output
is verified: image and array counts in the record, and the ``array_sha256`` of a few arrays
against a sha256 of the pixels computed here with tifffile. The run fails when the peak RSS is
not under ``--limit-mb`` (400 MB by default)::

    python benchmarks/collection.py --gib 2

``--fetch`` also measures ``emdata fetch`` of the same study packed as ``Study_7.tar.gz`` (gzip
level 1) and served by the Seafile replica on loopback: download, streaming extraction, hashing.
Working files go to ``benchmarks/.work/collection`` and are reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from normalize import MIB, code_state, run  # noqa: E402  (the shared runner: RSS sampling, idle wait)

SIZES = ((2048, 2048), (1024, 1024), (1536, 2048), (512, 512), (2048, 1536))
TARGETS = ("Nucleus", "Mitochondria", "Tubulin", "Actin")
KEY = "lightmycells_study_7"


def make_study(folder: Path, gib: float) -> dict[str, tuple[int, str]]:
    """OME-TIFF planes adding up to ``gib`` GiB; returns name -> (size, sha256 of the file)."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files: dict[str, tuple[int, str]] = {}
    total, image = 0, 0
    while total < gib * 2**30:
        image += 1
        h, w = SIZES[image % len(SIZES)]
        names = [f"image_{image}_BF_z{z}" for z in range(3)]
        names += [f"image_{image}_{t}" for t in TARGETS[: 2 + image % 3]]
        base = rng.integers(0, 4096, (h, w), dtype=np.uint16)
        for k, name in enumerate(names):
            path = folder / f"{name}.ome.tiff"
            channel = name.split("_", 2)[2].split("_z")[0]
            tifffile.imwrite(path, (base + k * 7)[None, None, None], ome=True, photometric="minisblack",
                             metadata={"axes": "TCZYX", "PhysicalSizeX": 0.1625, "PhysicalSizeXUnit": "µm",
                                       "PhysicalSizeY": 0.1625, "PhysicalSizeYUnit": "µm",
                                       "Channel": {"Name": [channel]}})
            data = path.read_bytes()
            files[path.name] = (len(data), hashlib.sha256(data).hexdigest())
            total += len(data)
    return files


def make_project(root: Path, raw_files: dict[str, tuple[int, str]], study: Path) -> None:
    import yaml

    from emdata.params.config import load_config
    from emdata.sources.dataset import resolve_dataset
    from emdata.sources.fetch.record import FetchedFile, FetchRecord, HashState
    from emdata.sources.lightmycells import share_file_url

    root.mkdir(parents=True, exist_ok=True)
    share = "https://seafile.example.invalid/d/0123456789abcdef/"
    entry = {"title": "generated study", "license": "-", "citation": "-", "modality": "BF",
             "source": {"kind": "lightmycells", "share_url": share, "study": {"file": "Study_7.tar.gz"}}}
    (root / "params.yaml").write_text(yaml.safe_dump({"normalize": {"chunks": [64, 64, 64], "image_chunks": [256, 256]},
                                                      "datasets": {KEY: entry}}))
    cfg = load_config(root)
    raw = cfg.raw_dir(KEY)
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    url = share_file_url(share, "Study_7.tar.gz")
    for name in raw_files:
        os.link(study / name, raw / name)
    files = {name: FetchedFile(f"{url}#{name}", size, digest) for name, (size, digest) in raw_files.items()}
    record = FetchRecord(KEY, "lightmycells", resolve_dataset(cfg, KEY).source.to_dict(), files)
    record.write(raw)
    HashState(cfg.hash_state_path(KEY)).remember_record(raw, record)  # as the fetch that hashed them leaves it


def verify(root: Path, study: Path, raw_files: dict[str, tuple[int, str]]) -> dict:
    import tifffile

    record = json.loads((root / "data" / "metadata" / f"{KEY}.json").read_text())
    images = {name.split("_")[1] for name in raw_files}
    if record["n_images"] != len(images) or len(record["arrays"]) != len(raw_files):
        raise SystemExit(f"record has {record['n_images']} images / {len(record['arrays'])} arrays, "
                         f"the study {len(images)} / {len(raw_files)}")
    for name in sorted(raw_files)[:: max(1, len(raw_files) // 4)]:
        parts = name.split(".")[0].split("_")
        path = f"inputs/{parts[2]}_{parts[3]}" if parts[2] == "BF" else f"targets/{parts[2]}"
        pixels = np.squeeze(tifffile.imread(study / name))
        want = hashlib.sha256(np.ascontiguousarray(pixels, "<u2").data).hexdigest()
        got = record["arrays"][f"images/{parts[1]}/{path}"]["array_sha256"]
        if got != want:
            raise SystemExit(f"{name}: array_sha256 {got} != {want}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--limit-mb", type=float, default=400.0)
    parser.add_argument("--fetch", action="store_true", help="also fetch the study as a tarball from the replica")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work" / "collection")
    args = parser.parse_args()
    work = args.workdir
    study = work / f"study_{args.gib:g}gib"
    manifest = study / "manifest.json"
    if manifest.is_file():
        raw_files = {k: tuple(v) for k, v in json.loads(manifest.read_text()).items()}
    else:
        started = time.perf_counter()
        print(f"generating a {args.gib:g} GiB study in {study} ...", flush=True)
        raw_files = make_study(study, args.gib)
        manifest.write_text(json.dumps(raw_files))
        print(f"  {len(raw_files)} files in {time.perf_counter() - started:.0f} s", flush=True)
    nbytes = sum(size for size, _ in raw_files.values())
    project = work / "project"
    make_project(project, raw_files, study)
    for out in (project / "data" / "processed" / f"{KEY}.h5", project / "data" / "metadata" / f"{KEY}.json"):
        out.unlink(missing_ok=True)
    print(f"study: {len(raw_files)} OME-TIFF files, {nbytes / 1e9:.2f} GB; {code_state()}", flush=True)
    result = run([sys.executable, "-m", "emdata", "-q", "normalize", KEY], project)
    record = verify(project, study, raw_files)
    ok = result.rss < args.limit_mb * 1e6
    print(f"normalize: {nbytes / result.seconds / 1e6:.0f} MB/s ({result.seconds:.1f} s), {record['n_images']} images, "
          f"{len(record['arrays'])} arrays; peak RSS {result.rss / MIB:.0f} MiB = {result.rss / 1e6:.0f} MB "
          f"(anon {result.anon / MIB:.0f} MiB, file {result.file / MIB:.0f} MiB); CPU {result.cpu:.1f} s; "
          f"others {result.others / result.seconds:.2f} cores; limit {args.limit_mb:.0f} MB: "
          f"{'holds' if ok else 'EXCEEDED'}", flush=True)
    if args.fetch:
        fetch(work, study, raw_files, args)
    if not ok:
        raise SystemExit(1)


def fetch(work: Path, study: Path, raw_files: dict[str, tuple[int, str]], args: argparse.Namespace) -> None:
    """Serve the study as Study_7.tar.gz from the Seafile replica and time `emdata fetch` of it."""
    import gzip
    import tarfile

    import yaml

    from emdata.testing.http_server import ReplicaServer
    from emdata.testing.lightmycells import SHARE, seafile_route, served_path

    root = work / "seafile"
    archive = root / served_path("Study_7.tar.gz").lstrip("/")
    if not archive.is_file():
        print("packing Study_7.tar.gz (gzip level 1) ...", flush=True)
        archive.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(archive, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
            for name in sorted(raw_files):
                tar.add(study / name, arcname=f"Study_7/{name}")
    project = work / "project_fetch"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    with ReplicaServer(root) as server:
        server.route(r"/d/(?P<share>[^/]+)/(?P<rest>(files/)?)", seafile_route(server))
        entry = {"title": "generated study", "license": "-", "citation": "-", "modality": "BF",
                 "source": {"kind": "lightmycells", "share_url": f"{server.url}/d/{SHARE}/",
                            "study": {"file": "Study_7.tar.gz"}}}
        (project / "params.yaml").write_text(yaml.safe_dump({"datasets": {KEY: entry}}))
        result = run([sys.executable, "-m", "emdata", "-q", "fetch", KEY], project)
    got = json.loads((project / "data" / "raw" / KEY / "source.json").read_text())["files"]
    if {k: (v["size"], v["sha256"]) for k, v in got.items()} != {k: tuple(v) for k, v in raw_files.items()}:
        raise SystemExit("the extracted files differ from the study's")
    size = archive.stat().st_size
    print(f"fetch (download {size / 1e9:.2f} GB from the Python replica + extract + hash): {result.seconds:.1f} s, "
          f"peak RSS {result.rss / MIB:.0f} MiB (anon {result.anon / MIB:.0f}, file {result.file / MIB:.0f}); "
          f"CPU {result.cpu:.1f} s", flush=True)


if __name__ == "__main__":
    main()
