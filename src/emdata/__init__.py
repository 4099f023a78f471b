"""emdata: public 3D electron-microscopy volumes as versioned, ML-ready HDF5.

The small public API is loaded lazily so that ``python -m emdata --help`` stays fast::

    import emdata
    vol = emdata.open_dataset("epfl_hippocampus")
    table = emdata.catalog()  # pandas DataFrame, one row per dataset

Type checkers see the real names (the package ships ``py.typed``). The configuration of a
project is not part of this front door: it lives in :mod:`emdata.params.config`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy loader below returns, for type checkers and editors
    from emdata.access.catalog import catalog as catalog
    from emdata.access.collection import Collection as Collection
    from emdata.access.collection import PairedPatches as PairedPatches
    from emdata.access.collection import open_collection as open_collection
    from emdata.access.open import open_dataset as open_dataset
    from emdata.access.sampling import GridPatches as GridPatches
    from emdata.access.sampling import RandomPatches as RandomPatches
    from emdata.access.tiling import run_tiled as run_tiled
    from emdata.access.volume import Volume as Volume

__version__ = "0.1.0"

_LAZY = {
    "catalog": "emdata.access.catalog",
    "open_dataset": "emdata.access.open",
    "Volume": "emdata.access.volume",
    "RandomPatches": "emdata.access.sampling",
    "GridPatches": "emdata.access.sampling",
    "run_tiled": "emdata.access.tiling",
    "open_collection": "emdata.access.collection",
    "Collection": "emdata.access.collection",
    "PairedPatches": "emdata.access.collection",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emdata' has no attribute {name!r}")
