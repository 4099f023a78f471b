"""A small DM3 (Gatan DigitalMicrograph v3) writer, for replicas only: no library writes DM3.

The container, as the readers (RosettaSciIO, ncempy) parse it:

- header: three big-endian uint32, version 3, the file size less 16, byte order 1 (little-endian
  data; ncempy refuses anything else);
- tag groups: sorted and open flags (one byte each), a big-endian uint32 tag count, then entries;
- an entry: one byte (20 group, 21 data), a big-endian uint16 label length, the label (Latin-1);
  a data entry goes on with ``%%%%``, a big-endian uint32 count of info words, the info words
  (big-endian uint32: the type code; arrays ``20, element type, length``; structs ``15, 0,
  nfields, (0, type) * nfields``) and the value in the data byte order.

Tags are given as nested Python values: a ``dict`` is a named group (written in the order given;
GMS sorts them), a ``list`` is a group of unnamed entries (``ImageList``, ``Dimensions``), a
``str`` is an array of uint16 characters (how GMS stores text), ``bool``/``int``/``float`` are
bool, int32 and float64, :class:`Typed` forces a type code (float32 calibrations, uint32 ids), and
a numpy array is image data (uint8 -> octets, RGBA -> uint32 per pixel, others by dtype).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GROUP, DATA = 20, 21
SIMPLE = {2: "h", 3: "i", 4: "H", 5: "I", 6: "f", 7: "d", 8: "?", 9: "b", 10: "B", 11: "q", 12: "Q"}
ARRAY_TYPES = {np.dtype(np.uint8): 10, np.dtype(np.int8): 9, np.dtype(np.int16): 2, np.dtype(np.uint16): 4,
               np.dtype(np.int32): 3, np.dtype(np.uint32): 5, np.dtype(np.float32): 6, np.dtype(np.float64): 7}
# DM image DataType codes (ImageData.DataType)
IMAGE_TYPES = {np.dtype(np.int16): 1, np.dtype(np.float32): 2, np.dtype(np.uint8): 6, np.dtype(np.int32): 7,
               np.dtype(np.int8): 9, np.dtype(np.uint16): 10, np.dtype(np.uint32): 11, np.dtype(np.float64): 12}
RGBA = 23


@dataclass(frozen=True)
class Typed:
    """A simple value with an explicit DM type code (6 float32, 5 uint32, ...)."""

    code: int
    value: Any


def _label(name: str) -> bytes:
    raw = name.encode("latin-1")
    return struct.pack(">H", len(raw)) + raw  # the entry's type byte is written by the caller


def _data(info: list[int], payload: bytes) -> bytes:
    return b"%%%%" + struct.pack(f">I{len(info)}I", len(info), *info) + payload


def _encode_value(value: Any) -> bytes:
    if isinstance(value, Typed):
        return _data([value.code], struct.pack("<" + SIMPLE[value.code], value.value))
    if isinstance(value, bool):
        return _data([8], struct.pack("<?", value))
    if isinstance(value, int):
        return _data([3], struct.pack("<i", value))
    if isinstance(value, float):
        return _data([7], struct.pack("<d", value))
    if isinstance(value, str):
        chars = [ord(c) for c in value]
        return _data([20, 4, len(chars)], struct.pack(f"<{len(chars)}H", *chars))
    if isinstance(value, np.ndarray):
        flat = np.ascontiguousarray(value)
        if flat.dtype == np.dtype([("B", "u1"), ("G", "u1"), ("R", "u1"), ("A", "u1")]):
            flat = flat.view("<u4")
        code = ARRAY_TYPES[flat.dtype.newbyteorder("=")]
        return _data([20, code, flat.size], flat.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes())
    raise TypeError(f"cannot encode {type(value).__name__} as a DM3 tag")


def _encode_entries(entries: list[tuple[str, Any]]) -> bytes:
    out = bytearray(struct.pack(">BBI", 1, 1, len(entries)))
    for name, value in entries:
        if isinstance(value, (dict, list)):
            out += bytes([GROUP]) + _label(name) + _encode_group(value)
        else:
            out += bytes([DATA]) + _label(name) + _encode_value(value)
    return bytes(out)


def _encode_group(group: dict[str, Any] | list[Any]) -> bytes:
    entries = list(group.items()) if isinstance(group, dict) else [("", v) for v in group]
    return _encode_entries(entries)


def dm3_bytes(tags: dict[str, Any]) -> bytes:
    """A whole DM3 file holding ``tags`` (the root group)."""
    body = _encode_group(tags)
    return struct.pack(">III", 3, len(body) + 4, 1) + body + b"\x00" * 8  # size field: file size - 16


def data_offsets(blob: bytes, arrays: list[np.ndarray]) -> list[int]:
    """Where each array's bytes start in ``blob`` (for checking readers against the writer)."""
    return [blob.index(np.ascontiguousarray(a).tobytes()) for a in arrays]


def calibration(scale: float, units: str, origin: float = 0.0) -> dict[str, Any]:
    return {"Origin": Typed(6, origin), "Scale": Typed(6, scale), "Units": units}


def image_entry(data: np.ndarray, *, scale: float, units: str, name: str, tags: dict[str, Any] | None = None,
                description: str | None = None, uid: int = 0) -> dict[str, Any]:
    """One ``ImageList`` entry: a 2D image (``Dimensions.0`` is the width) with its calibration."""
    rgba = data.dtype.names is not None
    height, width = data.shape
    entry: dict[str, Any] = {}
    if description is not None:
        entry["Description"] = description
    entry["ImageData"] = {
        "Calibrations": {
            "Brightness": calibration(1.0, ""),
            "Dimension": [calibration(scale, units), calibration(scale, units)],
            "DisplayCalibratedUnits": True,
        },
        "Data": data,
        "DataType": RGBA if rgba else IMAGE_TYPES[data.dtype.newbyteorder("=")],
        "Dimensions": [Typed(5, width), Typed(5, height)],
        "PixelDepth": Typed(5, 4 if rgba else data.dtype.itemsize),
    }
    entry["ImageTags"] = tags or {}
    entry["Name"] = name
    entry["UniqueID"] = {str(i): Typed(5, (uid * 7919 + i * 104729) % 2**31) for i in range(4)}
    return entry


def rgba_thumbnail(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A grey RGBA thumbnail of ``image`` (nearest-neighbour), as GMS stores it first in ImageList."""
    h, w = shape
    ys = np.arange(h) * image.shape[0] // h
    xs = np.arange(w) * image.shape[1] // w
    grey = image[np.ix_(ys, xs)].astype(np.uint8)
    out = np.zeros(shape, dtype=[("B", "u1"), ("G", "u1"), ("R", "u1"), ("A", "u1")])
    out["B"], out["G"], out["R"], out["A"] = grey, grey, grey, 255
    return out
