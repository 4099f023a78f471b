"""OMERO's description of an image (its JSON API's ``Image`` and ``Pixels``), and whether a TIFF holds that image.

Pure functions on the API's answers, no I/O but the TIFF's: sizes, pixel type and physical sizes
(units converted to nm) of an ``Image`` (``data`` may be an object or a one-element list, as
OMERO's docs show both); :func:`check_tiff`, which compares a submitted TIFF with them before
anything trusts it; and :func:`voxel_size`, OMERO's voxel size cross-checked against the TIFF's
ImageJ tags (``XResolution``/``YResolution`` in pixels per unit, ``spacing``, ``unit``): the
candidates ``omero`` and ``imagej`` of :func:`emdata.core.geometry.pick`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emdata.core.geometry import PARAMS, pick
from emdata.errors import FormatError
from emdata.formats.imagej import imagej_info, voxel_size_nm
from emdata.formats.raw import IntTriple, Triple
from emdata.formats.tiff import TiffStack

LENGTH_NM = {"PICOMETER": 1e-3, "ANGSTROM": 0.1, "NANOMETER": 1.0, "MICROMETER": 1e3, "MILLIMETER": 1e6,
             "CENTIMETER": 1e7, "DECIMETER": 1e8, "METER": 1e9}
GEOMETRY_CANDIDATES = ("omero", "imagej")  # the voxel size, read twice (geometry_trust picks one)
VOXEL_LABELS = {"omero": "OMERO", "imagej": "ImageJ tags"}  # as the provenance names them
PIXEL_TYPES = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
               "float": "f4", "double": "f8"}


@dataclass(frozen=True)
class Pixels:
    """The parts of OMERO's Image that decide the volume."""

    shape: IntTriple  # z, y, x
    channels: int
    timepoints: int
    pixel_type: str
    voxel_size_nm: Triple | None  # z, y, x; None when OMERO lacks one of them

    @property
    def dtype(self) -> np.dtype | None:
        code = PIXEL_TYPES.get(self.pixel_type)
        return np.dtype(code) if code else None

    def describe(self) -> str:
        return f"{' × '.join(map(str, self.shape))} {self.pixel_type}"


def _image_object(dataset: str, url: str, answer: Any) -> dict[str, Any]:
    """The Image in ``{"data": {...}}`` or ``{"data": [{...}]}`` (OMERO's docs show both)."""
    data = answer.get("data") if isinstance(answer, dict) else None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict) or not isinstance(data.get("Pixels"), dict):
        raise FormatError(dataset, url, "the answer holds no Image with Pixels (expected {\"data\": {...}})",
                          "check source.omero_url and source.image_id in params.yaml")
    return data


def length_nm(value: Any) -> float | None:
    """An OMERO length (``{"Value": 0.02, "Unit": "MICROMETER", "Symbol": "µm"}``) in nm."""
    if not isinstance(value, dict) or not isinstance(value.get("Value"), (int, float)):
        return None
    factor = LENGTH_NM.get(str(value.get("Unit", "")).upper())
    number = float(value["Value"])
    if factor is None or not math.isfinite(number) or number <= 0:
        return None
    return number * factor


def parse_pixels(dataset: str, url: str, answer: Any) -> Pixels:
    """The Pixels of the Image an ``/api/v0/m/images/<id>/`` answer (from ``url``) holds."""
    px = _image_object(dataset, url, answer)["Pixels"]
    try:
        sizes = [int(px[f"Size{a}"]) for a in "ZYXCT"]
        pixel_type = str(px["Type"]["value"] if isinstance(px["Type"], dict) else px["Type"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(dataset, url, f"the Image's Pixels lack {exc} (SizeX/Y/Z/C/T and Type are expected)",
                          "check source.omero_url in params.yaml") from exc
    lengths = [length_nm(px.get(f"PhysicalSize{a}")) for a in "ZYX"]
    voxel = None if None in lengths else tuple(lengths)
    return Pixels(tuple(sizes[:3]), sizes[3], sizes[4], pixel_type, voxel)  # type: ignore[arg-type]


def list_page(answer: Any, url: str, listed: dict[Any, Any], offset: int, name: str,
              dataset: str) -> tuple[dict[Any, Any], int, int]:
    """What one page of an OMERO list (``{"data": [...], "meta": {"totalCount": n}}``) at ``offset`` adds to
    the items ``listed`` so far (by ``@id``), the list's totalCount, and the page's length.

    Each page must add items until ``totalCount`` is reached: a server that ignores ``offset`` (the
    same page again) or ends early is one FormatError, not an endless loop or a short listing.
    """
    page = answer.get("data") if isinstance(answer, dict) else None
    meta = answer.get("meta") if isinstance(answer, dict) else None
    total = meta.get("totalCount") if isinstance(meta, dict) else None
    if not isinstance(page, list) or not isinstance(total, int) or isinstance(total, bool):
        raise FormatError(dataset, url, "the answer is not an OMERO list ({\"data\": [...], \"meta\": {...}})",
                          "check source.omero_url in params.yaml")
    new = {item.get("@id"): item for item in page if isinstance(item, dict) and item.get("@id") not in listed}
    if not new and offset < total:
        what = "is empty" if not page else "repeats images listed before (the server ignores offset?)"
        raise FormatError(dataset, url, f"{name}'s image list {what}: {len(listed)} images listed of the {total} "
                          "its totalCount says", "try again later; if it persists, the OMERO server's listing is "
                          "broken: check source.omero_url in params.yaml")
    return new, total, len(page)


def check_tiff(dataset: str, where: str, path: Path, pixels: Pixels, image_url: str) -> None:
    """The TIFF holds every plane the API counts, in the API's shape and pixel type, else FormatError."""
    expected = pixels.dtype
    if expected is None:
        raise FormatError(dataset, image_url, f"OMERO pixel type {pixels.pixel_type!r} is not supported",
                          "choose another image id")
    with TiffStack(path, dataset) as stack:  # a file tifffile cannot parse fails here, naming it
        info = imagej_info(path, dataset)
        size = path.stat().st_size
        if info["contiguous"] and info["first_strip_offset"] is not None:
            # tifffile shortens an ImageJ stack whose data end early: count the bytes against OMERO's planes.
            need = info["first_strip_offset"] + int(np.prod(pixels.shape)) * expected.itemsize
            if size < need:
                raise FormatError(dataset, where, f"the file holds {size} bytes but the {pixels.shape[0]} planes "
                                  f"OMERO counts need {need}; it is truncated", "the file on the server may be "
                                  "damaged; try again later or use pixels: render")
        got = f"{' × '.join(map(str, stack.shape))} {stack.dtype.name}"
        if tuple(stack.shape) != pixels.shape or stack.dtype != expected:
            raise FormatError(dataset, where, f"the TIFF is {got} but OMERO image {image_url} is {pixels.describe()}",
                              "check source.image_id and source.original in params.yaml (they must name "
                              "the same image)")


def voxel_size(pixels: Pixels, info: dict[str, Any] | None, trust: str | None,
               dataset: str, where: str) -> tuple[Triple | None, str]:
    """OMERO's voxel size, cross-checked against the ImageJ tags (``info``); and where it came from.

    More than 1 % apart is a FormatError unless ``trust`` (the dataset's ``geometry_trust``) names
    ``omero`` or ``imagej``, or is ``params`` (passed only when params.yaml's voxel size overrides both).
    Tags without ``spacing`` say nothing of z: OMERO's z completes them.
    """
    omero = pixels.voxel_size_nm
    tags = voxel_size_nm(info) if info is not None else None
    imagej = None
    if tags is not None and (tags[0] is not None or omero is not None):
        imagej = (tags[0] if tags[0] is not None else omero[0], tags[1], tags[2])  # type: ignore[index]
    choice = pick("voxel size", {"omero": omero, "imagej": imagej}, trust, key=dataset, labels=VOXEL_LABELS,
                  trusted_by={"omero": (PARAMS,)}, where=where)
    if choice.name == "imagej" and omero is None:
        return choice.value, "imagej (OMERO has none)"
    return choice.value, choice.origin


def open_tiff(path: Path, pixels: Pixels, image_url: str, trust: str | None, dataset: str) -> TiffStack:
    """The TIFF of an OMERO image, checked against it, with the voxel size :func:`voxel_size` chooses
    (OMERO images carry no translation: offset 0)."""
    check_tiff(dataset, str(path), path, pixels, image_url)
    stack = TiffStack(path, dataset)
    try:
        stack.voxel_size_nm, _ = voxel_size(pixels, imagej_info(path, dataset), trust, dataset, str(path))
        stack.offset_nm = (0.0, 0.0, 0.0)
    except BaseException:
        stack.close()
        raise
    return stack
