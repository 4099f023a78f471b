"""labelme annotation files holding rectangles whose label is an object's identity (tracking sets).

What is accepted (the organoid tracking set, SOURCES.md §7): ``version`` 4.5.6 or 4.5.7 (its
README says 4.5.7, its example file 4.5.6), ``imageHeight``/``imageWidth``, ``imagePath``,
``imageData`` base64 or null, and ``shapes`` of ``shape_type: rectangle`` with two corner points
in any order and a ``label`` that is the identity (a non-negative integer, the same across the
frames of a series). A shape that is not a rectangle, a box that leaves the image, an identity
twice in one frame, or a malformed file is a FormatError naming the file.

``imageData`` embeds the whole image (tens of MB for a 9,000 x 9,000 montage): it is skipped while
the file is read in 1 MiB blocks and only checked to be base64, so a file costs its small part in
memory, not the embedded image.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from emdata.errors import FormatError
from emdata.formats.raw import RawVolume

VERSIONS = ("4.5.6", "4.5.7")
BLOCK = 1 << 20
_KEY = b'"imageData"'
_BASE64 = re.compile(rb"[A-Za-z0-9+/=]*")
_SPECIAL = re.compile(rb'[\\"]')
IDENTITY = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Box:
    identity: int
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class Annotation:
    version: str
    height: int
    width: int
    image_path: str
    image_data: str  # "base64" or "null"
    boxes: tuple[Box, ...]


def _error(dataset: str, path: Path, problem: str) -> FormatError:
    return FormatError(dataset, str(path), problem,
                       "fix or remove this labelme file in the source folder, then run `emdata fetch "
                       f"{dataset}` again")


def _find(fh: BinaryIO, needle: bytes, start: int) -> int:
    """Offset of the first ``needle`` at or after ``start``, reading blocks; -1 if none."""
    fh.seek(start)
    pos, tail = start, b""
    while True:
        block = fh.read(BLOCK)
        if not block:
            return -1
        data = tail + block
        at = data.find(needle)
        if at >= 0:
            return pos - len(tail) + at
        tail = data[-(len(needle) - 1):] if len(needle) > 1 else b""
        pos += len(block)


def _string_end(fh: BinaryIO, start: int) -> tuple[int, bool]:
    """Offset of the quote closing a JSON string whose first character is at ``start``, and
    whether the string is base64 (its only escape being JSON's optional ``\\/``); -1 if it never ends."""
    fh.seek(start)
    pos, pending, ok = start, False, True
    while True:
        block = fh.read(BLOCK)
        if not block:
            return -1, False
        i = 0
        if pending:  # the previous block ended on a backslash: this byte is escaped
            ok = ok and block[:1] == b"/"
            i, pending = 1, False
        while True:
            m = _SPECIAL.search(block, i)
            ok = ok and _BASE64.fullmatch(block, i, m.start() if m else len(block)) is not None
            if m is None:
                break
            if block[m.start()] == 0x22:  # an unescaped quote ends the string
                return pos + m.start(), ok
            if m.start() + 1 == len(block):
                pending = True
                break
            ok = ok and block[m.start() + 1:m.start() + 2] == b"/"
            i = m.start() + 2
        pos += len(block)


def read_without_image_data(path: Path, dataset: str) -> tuple[dict[str, Any], str]:
    """The JSON object with ``imageData`` replaced by null, and what it held ("base64" or "null")."""
    try:
        with open(path, "rb") as fh:
            at = _find(fh, _KEY, 0)
            if at < 0:
                fh.seek(0)
                kind, text = "absent", fh.read()
            else:
                fh.seek(at + len(_KEY))
                window = fh.read(64)
                m = re.match(rb"\s*:\s*", window)
                if m is None:
                    raise _error(dataset, path, "is not valid JSON near imageData")
                value = at + len(_KEY) + m.end()
                first = window[m.end():m.end() + 1]
                if first == b'"':
                    end, is_base64 = _string_end(fh, value + 1)
                    if end < 0:
                        raise _error(dataset, path, "is not valid JSON: the imageData string never ends (truncated?)")
                    if not is_base64:
                        raise _error(dataset, path, "imageData is neither base64 nor null")
                    kind, resume = "base64", end + 1
                elif window[m.end():m.end() + 4] == b"null":
                    kind, resume = "null", value + 4
                else:
                    raise _error(dataset, path, "imageData is neither base64 nor null")
                fh.seek(0)
                head = fh.read(value)
                fh.seek(resume)
                text = head + b"null" + fh.read()
    except OSError as exc:
        raise _error(dataset, path, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _error(dataset, path, f"is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _error(dataset, path, "is not a labelme file (not a JSON object)")
    return data, kind


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def load(path: Path, dataset: str) -> Annotation:
    """Read and check one labelme file (see the module docstring for the rules)."""
    path = Path(path)
    data, kind = read_without_image_data(path, dataset)
    version = data.get("version")
    if version not in VERSIONS:
        raise _error(dataset, path, f"labelme version {version!r} is not one this reader knows ({', '.join(VERSIONS)})")
    if kind == "absent":
        raise _error(dataset, path, "has no imageData key (labelme always writes it, as base64 or null)")
    h, w = data.get("imageHeight"), data.get("imageWidth")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise _error(dataset, path, f"imageHeight/imageWidth must be positive integers, got {h!r}/{w!r}")
    height, width = int(h), int(w)  # type: ignore[arg-type]
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise _error(dataset, path, "has no list of shapes")
    boxes: list[Box] = []
    seen: dict[int, int] = {}
    for i, shape in enumerate(shapes):
        where = f"shape {i}"
        if not isinstance(shape, dict):
            raise _error(dataset, path, f"{where} is not an object")
        label = shape.get("label")
        where = f"shape {i} (label {label!r})"
        if shape.get("shape_type") != "rectangle":
            raise _error(dataset, path, f"{where} is a {shape.get('shape_type')!r}, not a rectangle")
        points = shape.get("points")
        if not (isinstance(points, list) and len(points) == 2
                and all(isinstance(p, list) and len(p) == 2 and all(_number(v) is not None for v in p)
                        for p in points)):
            raise _error(dataset, path, f"{where}: a rectangle needs two corner points [x, y], got {points!r}")
        if not isinstance(label, str) or not IDENTITY.fullmatch(label.strip()):
            raise _error(dataset, path, f"{where}: the label must be the organoid's identity, a non-negative integer")
        identity = int(label.strip())
        if identity in seen:
            raise _error(dataset, path, f"identity {identity} appears twice in this frame (shapes {seen[identity]} "
                         f"and {i})")
        seen[identity] = i
        (xa, ya), (xb, yb) = points
        x0, x1 = sorted((float(xa), float(xb)))
        y0, y1 = sorted((float(ya), float(yb)))
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise _error(dataset, path, f"{where} lies outside the {width} x {height} image "
                         f"(x {x0:g}..{x1:g}, y {y0:g}..{y1:g})")
        boxes.append(Box(identity, x0, y0, x1, y1))
    return Annotation(version=str(version), height=height, width=width, image_path=str(data.get("imagePath") or ""),
                      image_data=kind, boxes=tuple(sorted(boxes, key=lambda b: b.identity)))


class BoxMasks(RawVolume):
    """(T, Y, X) instance masks painted from each frame's boxes, only inside the box read.

    Value = identity + 1 (0 is background); a pixel belongs to every box it overlaps
    (``floor(x0)..ceil(x1)``); larger boxes are painted first, so a small object on a large one
    stays visible. uint16 unless an identity needs more.
    """

    def __init__(self, dataset: str, boxes: list[list[Any]], shape: tuple[int, int, int],
                 shapes: list[tuple[int, int]]) -> None:
        self.dataset = dataset
        self.shape = shape
        self.shapes = shapes
        top = max((b.identity for frame in boxes for b in frame), default=0) + 1
        self.dtype = np.dtype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)
        # paint order: larger boxes first, so a small organoid on a large one stays visible
        self.boxes = [sorted(frame, key=lambda b: (-(b.x1 - b.x0) * (b.y1 - b.y0), b.identity)) for frame in boxes]

    def opener(self) -> "RawVolume":
        """Itself (a CollectionItem's ``open``): files open lazily, one at a time."""
        return self

    def read_box(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> np.ndarray:
        (z0, y0, x0), (z1, y1, x1) = start, stop
        out = np.zeros((z1 - z0, y1 - y0, x1 - x0), self.dtype)
        for k, i in enumerate(range(z0, z1)):
            h, w = self.shapes[i]
            for b in self.boxes[i]:
                r0, r1 = max(int(np.floor(b.y0)), y0), min(int(np.ceil(b.y1)), h, y1)
                c0, c1 = max(int(np.floor(b.x0)), x0), min(int(np.ceil(b.x1)), w, x1)
                if r0 < r1 and c0 < c1:
                    out[k, r0 - y0:r1 - y0, c0 - x0:c1 - x0] = b.identity + 1
        return out
