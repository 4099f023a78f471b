"""EPFL CVLab hippocampus (mouse CA1, FIB-SEM, ~5 nm isotropic).

Plain HTTPS static files, no API: one multipage uint8 TIFF per volume (``volumedata.tif``, the
full 1065-page stack) and the Lucchi mitochondria benchmark pairs (``training.tif`` +
``training_groundtruth.tif``, ``testing.tif`` + ``testing_groundtruth.tif``). The TIFFs carry
no voxel size, so it comes from params.yaml (``voxel_size_nm``). Pages are Z; their orientation
is read from each file. Labels are stored under ``/labels/<name>`` with their native values.

Cite: Lucchi, Smith, Achanta, Knott, Fua, "Supervoxel-Based Segmentation of Mitochondria in EM
Image Stacks with Learned Shape Features", IEEE TMI 2012. No explicit licence is published.

params.yaml::

    source:
      kind: epfl
      base_url: https://documents.epfl.ch/groups/c/cv/cvlab-unit/www/data/%20ElectronMicroscopy_Hippocampus/
      image: {file: training.tif, size: null, sha256: null}
      labels:
        mitochondria: {file: training_groundtruth.tif}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emdata.formats.raw import RawVolume
from emdata.formats.tiff import TiffStack
from emdata.params.schema import Section, as_folder_url, as_named, param, read_params
from emdata.sources.fetch.context import FetchContext
from emdata.sources.fetch.files import FilePlan, RemoteFile, as_remote_file, fetch_files, in_folder, plan_files
from emdata.sources.fetch.record import FetchRecord

KIND = "epfl"
READERS = ("emdata.formats.tiff",)  # code that decides the normalized bytes (see emdata.stages.codedeps)


@dataclass(frozen=True)
class Params:
    base_url: str = param(as_folder_url)
    image: RemoteFile = param(using=lambda got: as_remote_file(in_folder(got["base_url"])))
    labels: dict[str, RemoteFile] = param(using=lambda got: as_named(as_remote_file(in_folder(got["base_url"]))),
                                          default={})

    @property
    def files(self) -> list[RemoteFile]:
        return [self.image, *self.labels.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "base_url": self.base_url, "image": self.image.to_dict(),
                "labels": {k: v.to_dict() for k, v in self.labels.items()}}


def parse_params(sec: Section) -> Params:
    return read_params(Params, sec)


def plan(params: Params, ctx: FetchContext) -> list[FilePlan]:
    return plan_files(ctx, params.files)


def fetch(params: Params, ctx: FetchContext) -> FetchRecord:
    return ctx.record(fetch_files(ctx, params.files))


def open_volume(params: Params, raw: Path, dataset: str) -> TiffStack:
    return TiffStack(raw / params.image.name, dataset)


def open_labels(params: Params, raw: Path, dataset: str) -> dict[str, RawVolume]:
    return {name: TiffStack(raw / spec.name, dataset) for name, spec in params.labels.items()}


def read_metadata(params: Params, raw: Path, dataset: str) -> dict[str, Any]:
    native = {}
    for spec in params.files:
        with TiffStack(raw / spec.name, dataset) as stack:
            native[spec.name] = stack.tags()
    return {"tiff": native}
