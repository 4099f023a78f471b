"""Single-plane OME-TIFF images: OME-XML metadata through tifffile, pixels as a lazy Z=1 volume.

The OME-XML is what tifffile reads from the first page (``TiffFile.ome_metadata``), parsed with
the standard library. From ``Image/Pixels``: ``DimensionOrder``, ``Type``, ``SizeX/Y/Z/C/T``,
``PhysicalSizeX/Y`` with their units (``PhysicalSizeXUnit``, default µm, as the OME schema
says) converted to nm, and the channel names. A plane image must have T = C = Z = 1 (Light My
Cells ships TCZYX with all three equal to 1); anything else, or XML that does not parse, is a
FormatError naming the file. Pixels are read by :class:`emdata.formats.tiff.TiffStack` (boxes, no
whole-file read for uncompressed files).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emdata.errors import FormatError
from emdata.core.numbers import ascii_int
from emdata.formats.tiff import TiffStack

# OME UnitsLength symbols -> nanometres (the schema's default unit for PhysicalSize* is µm)
UNITS_NM = {"pm": 1e-3, "Å": 0.1, "nm": 1.0, "µm": 1e3, "μm": 1e3, "um": 1e3, "micron": 1e3, "mm": 1e6,
            "cm": 1e7, "m": 1e9}
OME_TYPES = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
             "float": "f4", "double": "f8"}


@dataclass(frozen=True)
class OmeInfo:
    """What the OME-XML of a single-plane image says."""

    shape: tuple[int, int]  # (Y, X)
    dtype: str
    pixel_size_nm: tuple[float, float] | None  # (y, x); None when the XML gives none
    dimension_order: str
    channels: tuple[str, ...] = ()
    physical: dict[str, Any] = field(default_factory=dict)  # the values and units as written

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "dimension_order": self.dimension_order,
                "pixel_size_nm": list(self.pixel_size_nm) if self.pixel_size_nm else None,
                "channels": list(self.channels), "physical": dict(self.physical)}


def _error(dataset: str, path: Path, problem: str) -> FormatError:
    return FormatError(dataset, str(path), problem,
                       f"the file is damaged or not a single-plane OME-TIFF; delete data/raw/{dataset} and run "
                       f"`emdata fetch {dataset}` again")


def _length_nm(pixels: ET.Element, axis: str, dataset: str, path: Path) -> tuple[float | None, dict[str, Any]]:
    value = pixels.get(f"PhysicalSize{axis}")
    unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
    written = {f"PhysicalSize{axis}": value, f"PhysicalSize{axis}Unit": unit}
    if value is None:
        return None, written
    try:
        number = float(value)
    except ValueError:
        raise _error(dataset, path, f"PhysicalSize{axis}={value!r} is not a number") from None
    if unit not in UNITS_NM:
        raise _error(dataset, path, f"PhysicalSize{axis}Unit={unit!r} is not a length unit this reader knows "
                     f"({', '.join(UNITS_NM)})")
    if not math.isfinite(number) or number <= 0:
        raise _error(dataset, path, f"PhysicalSize{axis}={value} is not a positive size")
    return number * UNITS_NM[unit], written


def parse_ome_xml(xml: str, dataset: str, path: Path) -> OmeInfo:
    """The :class:`OmeInfo` of a single-plane image's OME-XML; FormatError if it is not one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise _error(dataset, path, f"its OME-XML does not parse ({exc})") from exc
    if not root.tag.endswith("OME"):
        raise _error(dataset, path, f"its XML root is {root.tag!r}, not OME")
    images = root.findall("{*}Image")
    if len(images) != 1:
        raise _error(dataset, path, f"its OME-XML describes {len(images)} images; one is expected")
    pixels = images[0].find("{*}Pixels")
    if pixels is None:
        raise _error(dataset, path, "its OME-XML has no Pixels element")
    sizes = {}
    for axis in "TCZYX":
        value = pixels.get(f"Size{axis}")
        number = ascii_int(value)
        if number is None or number < 1:
            raise _error(dataset, path, f"Pixels Size{axis}={value!r} is not a positive integer")
        sizes[axis] = number
    extra = {a: n for a, n in sizes.items() if a in "TCZ" and n != 1}
    if extra:
        raise _error(dataset, path, "a single plane is expected (T = C = Z = 1), the OME-XML says "
                     + ", ".join(f"{a} = {n}" for a, n in extra.items()))
    kind = pixels.get("Type", "")
    if kind not in OME_TYPES:
        raise _error(dataset, path, f"Pixels Type={kind!r} is not a greyscale type this reader knows")
    y, y_written = _length_nm(pixels, "Y", dataset, path)
    x, x_written = _length_nm(pixels, "X", dataset, path)
    if (x is None) != (y is None):
        raise _error(dataset, path, "the OME-XML gives PhysicalSize for only one of X and Y")
    z_value = pixels.get("PhysicalSizeZ")
    physical = {**y_written, **x_written, **({"PhysicalSizeZ": z_value, "PhysicalSizeZUnit":
                                               pixels.get("PhysicalSizeZUnit", "µm")} if z_value else {})}
    channels = tuple(c.get("Name") or c.get("ID") or "" for c in pixels.findall("{*}Channel"))
    return OmeInfo(shape=(sizes["Y"], sizes["X"]), dtype=str(np.dtype(OME_TYPES[kind])),
                   pixel_size_nm=(y, x) if x is not None and y is not None else None,
                   dimension_order=pixels.get("DimensionOrder", ""), channels=channels, physical=physical)


def read_ome(path: Path, dataset: str) -> OmeInfo:
    """Parse one file's OME-XML and check it against the TIFF's own page (shape and dtype)."""
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
            page = tif.pages.first
            page_shape = tuple(int(n) for n in page.shape)
            page_dtype = np.dtype(page.dtype)
            samples = int(page.samplesperpixel)
    except FormatError:
        raise
    except Exception as exc:  # tifffile raises many types on broken files
        raise _error(dataset, path, f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc
    if not xml:
        raise _error(dataset, path, "it carries no OME-XML (ImageDescription of the first page)")
    info = parse_ome_xml(xml, dataset, path)
    if samples != 1 or page_shape != info.shape:
        raise _error(dataset, path, f"its first page is {page_shape} with {samples} samples per pixel, the OME-XML "
                     f"says {info.shape}")
    if page_dtype != np.dtype(info.dtype):
        raise _error(dataset, path, f"its pixels are {page_dtype}, the OME-XML says {info.dtype}")
    return info


def open_plane(path: Path, dataset: str) -> TiffStack:
    """A lazy (1, Y, X) view of an OME-TIFF plane (the pixels; :func:`read_ome` for its metadata)."""
    return TiffStack(Path(path), dataset)
