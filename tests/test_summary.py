"""summarize: table, markdown and thumbnails from the records, byte-identical on rerun."""

from __future__ import annotations

import csv

from emdata.h5.metadata import write_record
from emdata.stages.normalize.volume import normalize_dataset
from emdata.stages.fetch import fetch_dataset
from emdata.stages.summarize import summarize


def test_summary_is_deterministic_and_complete(epfl_project) -> None:
    cfg = epfl_project
    for key in ("epfl_mito_train", "epfl_hippocampus"):
        fetch_dataset(cfg, key)
        normalize_dataset(cfg, key)
        write_record(cfg, key)
    first = {p: p.read_bytes() for p in summarize(cfg)}
    second = {p: p.read_bytes() for p in summarize(cfg)}
    assert first == second
    names = sorted(p.name for p in first)
    assert names == ["METADATA_SUMMARY.md", "epfl_hippocampus_histogram.png", "epfl_hippocampus_xy.png",
                     "epfl_hippocampus_xz.png", "epfl_mito_train_histogram.png", "epfl_mito_train_mitochondria_xy.png",
                     "epfl_mito_train_mitochondria_xz.png", "epfl_mito_train_xy.png", "epfl_mito_train_xz.png",
                     "metadata.csv"]
    rows = list(csv.DictReader((cfg.root / "data" / "metadata.csv").open()))
    assert [r["dataset"] for r in rows] == ["epfl_hippocampus", "epfl_mito_train"]
    assert rows[1]["shape_zyx"] == "17x29x43" and rows[1]["labels"] == "mitochondria"
    text = (cfg.root / "METADATA_SUMMARY.md").read_text()
    assert "| `epfl_mito_test` | FIB-SEM | not built yet |" in text
    assert "![epfl_mito_train XZ](thumbnails/epfl_mito_train_xz.png)" in text
    assert "Lucchi et al." in text


def test_thumbnails_keep_the_physical_aspect_ratio(epfl_project) -> None:
    from PIL import Image

    fetch_dataset(epfl_project, "epfl_hippocampus")
    normalize_dataset(epfl_project, "epfl_hippocampus")
    write_record(epfl_project, "epfl_hippocampus")
    summarize(epfl_project)
    with Image.open(epfl_project.root / "thumbnails" / "epfl_hippocampus_xz.png") as img:
        width, height = img.size  # section (z=21, x=53) at 5 nm both ways
    assert width == 384 and abs(height - round(384 * 21 / 53)) <= 1
