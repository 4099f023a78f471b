"""ImageJ's calibration in a TIFF: the ``ImageJ=`` description and the resolution tags, as nm.

ImageJ stores the pixel width and height as ``XResolution``/``YResolution`` (pixels per unit,
a rational such as 50000000/1000000), the plane spacing as ``spacing=`` in the description, and
the unit as ``unit=``, with non-ASCII characters written as Java escapes (``unit=\\u00B5m``);
``ResolutionUnit`` is then 1 (none). tifffile parses the description but leaves the escape as
it is, so it is decoded here. Reading opens only the first page (an ImageJ stack's other IFDs
may lie after gigabytes of pixel data).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from emdata.errors import FormatError

UNIT_NM = {"pm": 1e-3, "å": 0.1, "angstrom": 0.1, "nm": 1.0, "nanometer": 1.0, "µm": 1e3, "um": 1e3,
           "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "mm": 1e6, "cm": 1e7, "m": 1e9, "inch": 2.54e7}


def decode_escapes(text: str) -> str:
    """``\\u00B5m`` -> ``µm``; the Greek mu (U+03BC) counts as the micro sign (U+00B5)."""
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    return text.replace("\u03bc", "\u00b5")


def imagej_info(path: Path, dataset: str) -> dict[str, Any]:
    """The first page's ImageJ metadata and resolution tags, JSON-safe (``unit`` decoded).

    Keys: ``imagej`` (tifffile's parse of the description, or ``{}``), ``unit`` (decoded, when
    given), ``XResolution``/``YResolution`` (``[numerator, denominator]``), ``ResolutionUnit``,
    ``first_strip_offset`` and ``contiguous`` (uncompressed, one run of strips).
    """
    try:
        return _read(path)
    except Exception as exc:  # tifffile raises many types on broken files
        raise FormatError(dataset, str(path), f"not a readable TIFF ({type(exc).__name__}: {exc})",
                          f"delete data/raw/{dataset} and run `emdata fetch {dataset}` again") from exc


def _read(path: Path) -> dict[str, Any]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        info: dict[str, Any] = {"imagej": dict(tif.imagej_metadata or {}),
                                "first_strip_offset": int(page.dataoffsets[0]) if page.dataoffsets else None,
                                "contiguous": bool(page.is_contiguous) and int(page.compression) == 1}
        for name in ("XResolution", "YResolution", "ResolutionUnit"):
            if name in page.tags:
                value = page.tags[name].value
                info[name] = [int(v) for v in value] if isinstance(value, tuple) else int(value)
    unit = info["imagej"].get("unit")
    if isinstance(unit, str):
        info["unit"] = decode_escapes(unit)
    return info


def voxel_size_nm(info: dict[str, Any]) -> tuple[float | None, float, float] | None:
    """(z, y, x) in nm from :func:`imagej_info`; z is None without ``spacing``.

    None without an ImageJ ``unit`` of length: a plain TIFF's resolution (often a 72 dpi default
    that no microscope set) is not taken for a calibration.
    """
    unit = info.get("unit")
    factor = UNIT_NM.get(str(unit).strip().lower()) if unit else None
    rows, cols = info.get("YResolution"), info.get("XResolution")
    if factor is None or not all(isinstance(r, list) and len(r) == 2 and r[0] > 0 and r[1] > 0 for r in (rows, cols)):
        return None
    y = rows[1] / rows[0] * factor  # type: ignore[index]
    x = cols[1] / cols[0] * factor  # type: ignore[index]
    spacing = info["imagej"].get("spacing")
    z = float(spacing) * factor if isinstance(spacing, (int, float)) and spacing > 0 else None
    return z, y, x
