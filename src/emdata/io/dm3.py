"""Gatan DigitalMicrograph (DM3/DM4) images through RosettaSciIO, and stacks of them as ZYX volumes.

RosettaSciIO (``rsciio.digitalmicrograph``, the optional extra ``dm3``; GPL-3) parses the
container: header, tag tree, calibrations, and which image is the thumbnail (``Thumbnails``
names it; GMS stores an RGBA thumbnail as ``ImageList.0``, its size varying per file). The
image is opened lazily (a memory map per read), so a box read touches only the rows it needs
and nothing stays mapped afterwards. A stack keeps one parsed header per file, never pixels.

Units are converted once, here: calibrations in µm (or nm, Å, mm) to nm. The Z spacing of a
serial-block-face stack is ``ImageTags.SBFSEM.Record.Slice thickness`` (nm), else
``ImageTags.Meta Data.Dimension info.2`` (scale and unit); never ``SBFSEM.Approach``, which is
the approach-phase setting. Every reader failure is a FormatError naming the dataset and file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..raw import IntTriple, RawVolume, json_safe

UNIT_NM = {"nm": 1.0, "µm": 1e3, "μm": 1e3, "um": 1e3, "micron": 1e3, "mm": 1e6, "Å": 0.1, "A": 0.1, "pm": 1e-3}
INSTALL_HINT = 'install the DM3 reader with `pip install "emdata[dm3]"` (RosettaSciIO, GPL-3)'


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    """One DM3/DM4 file's image (the thumbnail skipped): header facts and a lazy 2D array."""

    path: Path
    shape: tuple[int, int]  # (y, x)
    dtype: np.dtype
    pixel_nm: tuple[float, float] | None  # (y, x); None when the calibration has no length unit
    origin_nm: tuple[float, float]
    units: tuple[str, str]
    tags: dict[str, Any]  # the reader's tag tree (original_metadata), the thumbnail left out
    _data: Any  # dask array over a memory map

    @property
    def image_tags(self) -> dict[str, Any]:
        return _get(self.tags, "ImageList", "TagGroup0", "ImageTags") or {}

    def slice_thickness_nm(self) -> tuple[float | None, str]:
        """The Z spacing the file records, and where it was found."""
        record = _number(_get(self.image_tags, "SBFSEM", "Record", "Slice thickness"))
        if record is not None and record > 0:
            return record, "ImageTags.SBFSEM.Record.Slice thickness"
        info = _get(self.image_tags, "Meta Data", "Dimension info", "2")
        scale, unit = _number(_get(info, "Scale")), str(_get(info, "Units") or "")
        if scale is not None and scale > 0 and unit in UNIT_NM:
            return scale * UNIT_NM[unit], "ImageTags.Meta Data.Dimension info.2"
        return None, "none"

    def acquired(self) -> dict[str, Any]:
        bar = _get(self.image_tags, "DataBar") or {}
        return {"date": bar.get("Acquisition Date"), "time": bar.get("Acquisition Time")}

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            return np.ascontiguousarray(self._data[y0:y1, x0:x1].compute(scheduler="synchronous"))
        except (OSError, ValueError) as exc:
            raise FormatError("", str(self.path), f"cannot read the image data ({type(exc).__name__}: {exc})",
                              "the file may be truncated; fetch it again") from exc


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
    axes = sorted(signal["axes"], key=lambda a: a.get("index_in_array", 0))
    units = tuple(str(a.get("units") or "") for a in axes)
    pixel_nm = None
    if all(u in UNIT_NM for u in units):
        pixel_nm = tuple(float(a["scale"]) * UNIT_NM[u] for a, u in zip(axes, units))
    origin_nm = tuple(float(a.get("offset") or 0.0) * UNIT_NM.get(u, 1.0) + 0.0 for a, u in zip(axes, units))
    tags = json_safe(signal.get("original_metadata") or {})
    image = Dm3Image(Path(path), tuple(int(n) for n in data.shape), np.dtype(data.dtype),  # type: ignore[arg-type]
                     pixel_nm, origin_nm, units, tags, data)  # type: ignore[arg-type]
    _check_extent(dataset, image)
    return image


def _unreadable(dataset: str, path: Path, exc: BaseException) -> FormatError:
    text = " ".join(str(exc).split())[:120]
    return FormatError(dataset, str(path), f"not a readable DM3/DM4 file ({type(exc).__name__}: {text})",
                       "the file is corrupt or not a DigitalMicrograph image; fetch it again")


def _check_extent(dataset: str, image: Dm3Image) -> None:
    """The pixel bytes the header points at must lie inside the file (a truncated file fails here)."""
    info = _get(image.tags, "ImageList", "TagGroup0", "ImageData", "Data")
    offset, nbytes = _number(_get(info, "offset")), _number(_get(info, "size_bytes"))
    size = image.path.stat().st_size
    if offset is not None and nbytes is not None and offset + nbytes > size:
        raise FormatError(dataset, str(image.path), f"the image data end at byte {int(offset + nbytes)} but the file "
                          f"has {size} bytes", "the file is truncated; fetch it again")


class Dm3Stack(RawVolume):
    """Single-image DM3 files, one Z section each, stacked in the order given (ZYX)."""

    def __init__(self, paths: list[Path], dataset: str) -> None:
        if not paths:
            raise FormatError(dataset, "DM3 stack", "no files to stack", "check the source's file pattern")
        self.dataset = dataset
        self.slices = [open_dm3(p, dataset) for p in paths]
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
        self.z_nm, self.z_from = first.slice_thickness_nm()
        self.pixel_from = "DM3 calibration"
        if first.pixel_nm is not None and self.z_nm is not None:
            self.voxel_size_nm = (self.z_nm, *first.pixel_nm)
            self.offset_nm = (0.0, *first.origin_nm)

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
                out[k] = image.read(y0, y1, x0, x1)
            except FormatError as exc:
                raise FormatError(self.dataset, exc.where, exc.problem, exc.hint) from exc
        return out

    def native_metadata(self) -> dict[str, Any]:
        first = self.slices[0]
        return {"dm3_tags": first.tags, "voxel_size_from": {"z": self.z_from, "yx": self.pixel_from},
                "slices": [{"file": s.path.name, **s.acquired()} for s in self.slices]}

