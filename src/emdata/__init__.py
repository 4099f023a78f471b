"""emdata: public 3D electron-microscopy volumes as versioned, ML-ready HDF5.

The small public API is loaded lazily so that ``python -m emdata --help`` stays fast::

    import emdata
    vol = emdata.open_dataset("epfl_hippocampus")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "open_dataset": "emdata.access.volume",
    "Volume": "emdata.access.volume",
    "RandomPatches": "emdata.access.sampling",
    "GridPatches": "emdata.access.sampling",
    "run_tiled": "emdata.access.tiling",
    "open_collection": "emdata.access.collection",
    "Collection": "emdata.access.collection",
    "PairedPatches": "emdata.access.collection",
    "load_config": "emdata.params.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emdata' has no attribute {name!r}")
