"""Gatan DigitalMicrograph (DM3/DM4) images through RosettaSciIO, and stacks of them as ZYX volumes.

RosettaSciIO (``rsciio.digitalmicrograph``, the optional extra ``dm3``; GPL-3) parses the
container: header, tag tree, calibrations, which image is the thumbnail (``Thumbnails`` names
it; GMS stores an RGBA thumbnail as ``ImageList.0``, its size varying per file), the image's
dtype and shape, and where its pixel bytes lie (``ImageData.Data`` offset and size, with the
header's byte order). Uncompressed rows are then read as boxes with ``os.preadv`` straight into
the output, as :mod:`emdata.formats.tiff` does: RosettaSciIO's own lazy arrays are memory maps, whose
touched pages would count in the process's RSS (measured: +70 MiB on EMPIAR-11759's real shape),
and its eager read loads the whole image. A stack keeps one parsed header per file, never pixels;
headers travel as JSON (:meth:`Dm3Image.header`), so a stack can be rebuilt and read without
RosettaSciIO (which, with the dask it imports, costs ~70 MiB of RSS itself).

Units are converted once, here: calibrations in µm (or nm, Å, mm) to nm. The Z spacing of a
serial-block-face stack is ``ImageTags.SBFSEM.Record.Slice thickness`` (nm), else
``ImageTags.Meta Data.Dimension info.2`` (scale and unit); never ``SBFSEM.Approach``, which is
the approach-phase setting. Every reader failure is a FormatError naming the dataset and file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import FormatError
from emdata.formats.raw import IntTriple, RawVolume, json_safe

PLAIN_TYPES = {1, 2, 6, 7, 9, 10, 11, 12}  # DM ImageData.DataType: int16, float32, uint8, int32, int8, uint16, ...
UNIT_NM = {"nm": 1.0, "µm": 1e3, "μm": 1e3, "um": 1e3, "micron": 1e3, "mm": 1e6, "Å": 0.1, "A": 0.1, "pm": 1e-3}
INSTALL_HINT = 'install the DM3 reader with `pip install "emdata[dm3]"` (RosettaSciIO, GPL-3)'


def _natural_key(name: str) -> list[Any]:
    # ASCII digits only: "²".isdigit() is true, yet int("²") raises
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"([0-9]+)", name))]


def natural_sorted(names: list[str]) -> list[str]:
    """``slice_2`` before ``slice_10``: numbers compare as numbers."""
    return sorted(names, key=_natural_key)


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


@dataclass
class Dm3Image:
    """One DM3/DM4 file's image (the thumbnail skipped): what its header says, and where its pixels are.

    :func:`open_dm3` fills it with RosettaSciIO; :meth:`header` and :meth:`from_header` carry it as
    JSON, so pixels can be read later without parsing the file (or importing the reader) again.
    """

    path: Path
    shape: tuple[int, int]  # (y, x)
    dtype: np.dtype  # native byte order
    file_dtype: np.dtype  # with the file's byte order
    offset: int  # of the first pixel byte in the file
    pixel_nm: tuple[float, float] | None  # (y, x); None when the calibration has no length unit
    origin_nm: tuple[float, float]
    units: tuple[str, str]
    z_nm: float | None  # the Z spacing the file records (a serial-section stack)
    z_from: str  # the tag it came from
    acquired: dict[str, Any]  # DataBar acquisition date and time
    tags: dict[str, Any] | None = None  # the reader's tag tree (original_metadata), the thumbnail left out

    def header(self, *, tags: bool = False) -> dict[str, Any]:
        out = {"shape": list(self.shape), "dtype": self.dtype.str, "file_dtype": self.file_dtype.str,
               "offset": self.offset, "pixel_nm": list(self.pixel_nm) if self.pixel_nm else None,
               "origin_nm": list(self.origin_nm), "units": list(self.units), "z_nm": self.z_nm,
               "z_from": self.z_from, "acquired": self.acquired}
        if tags:
            out["tags"] = self.tags
        return out

    @classmethod
    def from_header(cls, path: Path, header: dict[str, Any], dataset: str) -> "Dm3Image":
        try:
            image = cls(Path(path), tuple(int(n) for n in header["shape"]), np.dtype(header["dtype"]),  # type: ignore[arg-type]
                        np.dtype(header["file_dtype"]), int(header["offset"]),
                        tuple(header["pixel_nm"]) if header["pixel_nm"] else None,
                        tuple(header["origin_nm"]), tuple(header["units"]), header["z_nm"],
                        str(header["z_from"]), dict(header["acquired"]), header.get("tags"))
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(dataset, str(path), f"the stored DM3 header is incomplete ({exc!r})",
                              f"run `emdata fetch {dataset}` again") from exc
        _check_extent(dataset, image)
        return image

    @property
    def image_tags(self) -> dict[str, Any]:
        return _get(self.tags, "ImageList", "TagGroup0", "ImageTags") or {}

    def read_into(self, out: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> None:
        """Rows ``y0:y1``, columns ``x0:x1`` into ``out`` (2D, C-contiguous, native byte order)."""
        width = self.shape[1]
        item = self.file_dtype.itemsize
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise FormatError("", str(self.path), f"cannot open ({exc.strerror})", "fetch it again") from exc
        try:
            if x0 == 0 and x1 == width and out.dtype == self.file_dtype:
                self._pread(fd, out.data.cast("B"), self.offset + y0 * width * item)
                return
            rows = max(1, (8 << 20) // (width * item))  # bands of whole rows, at most ~8 MB
            for a in range(y0, y1, rows):
                b = min(y1, a + rows)
                band = np.empty((b - a, width), self.file_dtype)
                self._pread(fd, band.data.cast("B"), self.offset + a * width * item)
                out[a - y0:b - y0] = band[:, x0:x1]
        finally:
            os.close(fd)

    def _pread(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise FormatError("", str(self.path), f"the file ends before byte {offset + len(view)}",
                                  "the file is truncated; fetch it again")
            done += got


def open_dm3(path: Path, dataset: str) -> Dm3Image:
    """Parse ``path`` with RosettaSciIO: the one non-thumbnail 2D greyscale image, lazily."""
    try:
        from rsciio.digitalmicrograph import file_reader
    except ImportError as exc:
        raise FormatError(dataset, str(path), "RosettaSciIO (rsciio) is not installed", INSTALL_HINT) from exc
    try:
        signals = file_reader(str(path), lazy=True)
    except ValueError as exc:
        if "RGBA" in str(exc):
            raise FormatError(dataset, str(path), "the file holds an RGBA image that is not marked as its thumbnail",
                              "only greyscale images can be stacked") from exc
        raise _unreadable(dataset, path, exc) from exc
    except Exception as exc:  # the reader raises many types on broken files  # noqa: BLE001
        raise _unreadable(dataset, path, exc) from exc
    images = [s for s in signals if np.dtype(s["data"].dtype).names is None]
    if len(images) != 1 or np.ndim(images[0]["data"]) != 2:
        shapes = [tuple(np.shape(s["data"])) for s in signals]
        raise FormatError(dataset, str(path), f"expected one 2D greyscale image besides the thumbnail, found {shapes}",
                          "this reader stacks one image per file")
    signal = images[0]
    data = signal["data"]
    info = _get(signal.get("original_metadata") or {}, "ImageList", "TagGroup0", "ImageData")
    code = _get(info, "DataType")
    if code not in PLAIN_TYPES:
        raise FormatError(dataset, str(path), f"the image's DM data type {code} is not a plain integer or float type",
                          "only greyscale images can be stacked")
    where = _get(info, "Data") or {}
    order = "<" if where.get("endian", "little") == "little" else ">"
    axes = sorted(signal["axes"], key=lambda a: a.get("index_in_array", 0))
    units = tuple(str(a.get("units") or "") for a in axes)
    # A length unit does not make an axis spatial: a CL spectrum's wavelength is in nm too. The
    # reader names an image's axes y and x and navigates none; spectra get a signal axis.
    if any(a.get("name") not in ("x", "y") or a.get("navigate") for a in axes):
        described = ", ".join(f"{a.get('name')} ({a.get('units') or 'no unit'}"
                              f"{', navigation' if a.get('navigate') else ''})" for a in axes)
        raise FormatError(dataset, str(path), f"the image's axes are {described}: spectra, not a 2D image",
                          "fetching again gives the same file: only 2D images (axes y, x) can be stacked")
    pixel_nm = None
    if all(u in UNIT_NM for u in units):
        pixel_nm = tuple(float(a["scale"]) * UNIT_NM[u] for a, u in zip(axes, units))
    origin_nm = tuple(float(a.get("offset") or 0.0) * UNIT_NM.get(u, 1.0) + 0.0 for a, u in zip(axes, units))
    tags = json_safe(signal.get("original_metadata") or {})
    image_tags = _get(tags, "ImageList", "TagGroup0", "ImageTags") or {}
    bar = _get(image_tags, "DataBar") or {}
    dtype = np.dtype(data.dtype)
    image = Dm3Image(Path(path), tuple(int(n) for n in data.shape), dtype,  # type: ignore[arg-type]
                     dtype.newbyteorder(order), int(where.get("offset", -1)), pixel_nm,  # type: ignore[arg-type]
                     origin_nm, units, *slice_thickness_nm(image_tags),  # type: ignore[arg-type]
                     {"date": bar.get("Acquisition Date"), "time": bar.get("Acquisition Time")}, tags)
    _check_extent(dataset, image)
    return image


def slice_thickness_nm(image_tags: dict[str, Any]) -> tuple[float | None, str]:
    """The Z spacing a serial-section file records, and the tag it was found in."""
    record = _number(_get(image_tags, "SBFSEM", "Record", "Slice thickness"))
    if record is not None and record > 0:
        return record, "ImageTags.SBFSEM.Record.Slice thickness"
    info = _get(image_tags, "Meta Data", "Dimension info", "2")
    scale, unit = _number(_get(info, "Scale")), str(_get(info, "Units") or "")
    if scale is not None and scale > 0 and unit in UNIT_NM:
        return scale * UNIT_NM[unit], "ImageTags.Meta Data.Dimension info.2"
    return None, "none"


def _unreadable(dataset: str, path: Path, exc: BaseException) -> FormatError:
    text = " ".join(str(exc).split())[:120]
    return FormatError(dataset, str(path), f"not a readable DM3/DM4 file ({type(exc).__name__}: {text})",
                       "the file is corrupt or not a DigitalMicrograph image; fetch it again")


def _check_extent(dataset: str, image: Dm3Image) -> None:
    """The pixel bytes the header points at must lie inside the file (a truncated file fails here)."""
    nbytes = int(np.prod(image.shape)) * image.file_dtype.itemsize
    size = image.path.stat().st_size
    if image.offset < 0 or image.offset + nbytes > size:
        raise FormatError(dataset, str(image.path), f"the image data end at byte {image.offset + nbytes} but the file "
                          f"has {size} bytes", "the file is truncated; fetch it again")


class Dm3Stack(RawVolume):
    """Single-image DM3 files, one Z section each, stacked in the order given (ZYX).

    Built from parsed images (:meth:`parse` reads the files with RosettaSciIO; a source may keep
    their :meth:`Dm3Image.header` and rebuild the stack with :meth:`from_headers`, without the
    reader). Slices of unequal shape, dtype or calibration are a FormatError naming the file.
    """

    def __init__(self, images: list[Dm3Image], dataset: str) -> None:
        if not images:
            raise FormatError(dataset, "DM3 stack", "no files to stack", "check the source's file pattern")
        self.dataset = dataset
        self.slices = images
        first = self.slices[0]
        for image in self.slices[1:]:
            if image.shape != first.shape or image.dtype != first.dtype:
                raise FormatError(dataset, str(image.path), f"the slice is {image.shape} {image.dtype} but "
                                  f"{first.path.name} is {first.shape} {first.dtype}",
                                  "all slices of a stack must have one shape and dtype")
            if (image.pixel_nm is None) != (first.pixel_nm is None) or (
                    image.pixel_nm and first.pixel_nm and not np.allclose(image.pixel_nm, first.pixel_nm, rtol=0.01)):
                raise FormatError(dataset, str(image.path), f"the pixel size {image.pixel_nm} nm differs from "
                                  f"{first.path.name}'s {first.pixel_nm} nm", "all slices must share one calibration")
        self.shape = (len(self.slices), *first.shape)
        self.dtype = first.dtype
        self.z_nm, self.z_from = first.z_nm, first.z_from
        self.pixel_from = "DM3 calibration"
        if first.pixel_nm is not None and self.z_nm is not None:
            self.voxel_size_nm = (self.z_nm, *first.pixel_nm)
            self.offset_nm = (0.0, *first.origin_nm)

    @classmethod
    def parse(cls, paths: list[Path], dataset: str) -> "Dm3Stack":
        """Read each file's header with RosettaSciIO (the tag tree kept for the first only)."""
        images = []
        for i, path in enumerate(paths):
            image = open_dm3(path, dataset)
            if i:
                image.tags = None
            images.append(image)
        return cls(images, dataset)

    @classmethod
    def from_headers(cls, paths: list[Path], headers: list[dict[str, Any]], dataset: str) -> "Dm3Stack":
        return cls([Dm3Image.from_header(p, h, dataset) for p, h in zip(paths, headers)], dataset)

    def set_pixel_size(self, pixel_nm: tuple[float, float], origin: str) -> None:
        """Replace the in-plane pixel size (a source trusting its API over the file's calibration)."""
        self.pixel_from = origin
        if self.z_nm is not None:
            self.voxel_size_nm = (self.z_nm, *pixel_nm)
            self.offset_nm = self.offset_nm or (0.0, 0.0, 0.0)

    def read_box(self, start: IntTriple, stop: IntTriple) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1) = start, stop
        out = np.empty((z1 - z0, y1 - y0, x1 - x0), self.dtype)
        for k, image in enumerate(self.slices[z0:z1]):
            try:
                image.read_into(out[k], y0, y1, x0, x1)
            except FormatError as exc:
                raise FormatError(self.dataset, exc.where, exc.problem, exc.hint) from exc
        return out

    def native_metadata(self) -> dict[str, Any]:
        first = self.slices[0]
        return {"dm3_tags": first.tags or {}, "voxel_size_from": {"z": self.z_from, "yx": self.pixel_from},
                "slices": [{"file": s.path.name, **s.acquired} for s in self.slices]}

