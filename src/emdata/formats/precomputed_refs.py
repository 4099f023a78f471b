"""How params name a precomputed layer and one of its scales (shared by the ``precomputed`` source).

A layer is an http(s) URL (``precomputed://`` dropped, ``gs://bucket/path`` read as public HTTPS),
or, for a label layer, a path under the image layer's bucket; a scale is a key (``8.0x8.0x8.0``), an
isotropic resolution in nm, or a [z, y, x] resolution, matched within 1 %.
"""

from __future__ import annotations

import math
import urllib.parse
from typing import Any, Union

from emdata.errors import ConfigError
from emdata.formats.precomputed import Layer, Scale
from emdata.params.schema import as_str, config_error

ScaleRef = Union[str, float, tuple[float, float, float]]
IntTriple = tuple[int, int, int]


def as_layer_url(value: Any, path: str) -> str:
    """An http(s) layer URL; ``precomputed://`` is dropped and ``gs://b/p`` becomes public HTTPS."""
    text = as_str(value, path).strip()
    if text.startswith("precomputed://"):
        text = text[len("precomputed://"):]
    if text.startswith("gs://"):
        text = "https://storage.googleapis.com/" + text[len("gs://"):]
    if not text.startswith(("http://", "https://")) or "?" in text or "#" in text:
        raise config_error(path, f"expected the http(s) URL of a precomputed layer (or gs://bucket/path), got {value!r}")
    return text.rstrip("/")


def as_layer_path(value: Any, path: str) -> str:
    """A label layer: a full URL (as :func:`as_layer_url`) or a relative path under the image's bucket."""
    text = as_str(value, path).strip()
    if text.startswith(("precomputed://", "gs://", "http://", "https://")):
        return as_layer_url(text, path)
    parts = text.strip("/").split("/")
    if text.startswith("/") or "?" in text or "#" in text or "://" in text or any(p in ("", ".", "..") for p in parts):
        raise config_error(path, "expected a path under the bucket of source.url (such as 'v1.2/segmentation') or "
                           f"a layer's full URL, got {value!r}")
    return text.strip("/")


def bucket_root(url: str) -> str | None:
    """``scheme://host/<bucket>`` of a path-style layer URL, or None when the path has no bucket and layer."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    return f"{parts.scheme}://{parts.netloc}/{segments[0]}" if len(segments) >= 2 else None


def as_scale(value: Any, path: str) -> ScaleRef:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    if (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in value)):
        return (float(value[0]), float(value[1]), float(value[2]))
    raise config_error(path, "expected a scale key (such as '8.0x8.0x8.0'), a resolution in nm (8) or [z, y, x] nm, "
                       f"got {value!r}")


def as_voxel_triple(value: Any, path: str) -> IntTriple:
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise config_error(path, f"expected three integers [z, y, x] (voxels), got {value!r}")
    return (value[0], value[1], value[2])


def scale_dict(scale: ScaleRef | None) -> Any:
    return list(scale) if isinstance(scale, tuple) else scale


def find_scale(layer: Layer, wanted: ScaleRef, path: str) -> Scale:
    """The scale a params value names (key, or resolution within 1 %); a ConfigError lists the others."""
    for scale in layer.scales:
        if isinstance(wanted, str):
            if scale.key == wanted:
                return scale
            continue
        target = (wanted,) * 3 if isinstance(wanted, float) else wanted
        if all(abs(r - t) <= 0.01 * max(r, t) for r, t in zip(scale.resolution, target)):
            return scale
    have = ", ".join(s.label() for s in layer.scales)
    raise ConfigError(f"params.yaml: {path}: {layer.url}/info has no scale {scale_dict(wanted)!r} "
                      f"(resolutions z, y, x in nm; scales: {have})")
