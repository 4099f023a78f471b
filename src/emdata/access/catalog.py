"""``emdata.catalog()``: the datasets of a repository as a pandas DataFrame, one row per dataset.

It reads the committed ``data/metadata.csv`` (``emdata summarize`` writes it: every dataset in
params.yaml, with what params say before a build and the measured values after), so it needs no
built file, no DVC and no network; pandas comes with ``emdata[pipeline]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from emdata.errors import ConfigError, NotBuiltError
from emdata.params.layout import TABLE_FILE, find_root


def catalog(root: str | os.PathLike | None = None) -> Any:
    """``data/metadata.csv`` of the repository at ``root`` (default: the nearest holding params.yaml).

    Columns: ``dataset``, ``title``, ``source_kind``, ``modality``, ``shape_zyx``, ``voxel_size_nm_zyx``,
    ``license``, ``doi``, ... (the columns of METADATA_SUMMARY.md's table and more); e.g.
    ``emdata.catalog().query("modality == 'FIB-SEM'")``.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ConfigError("emdata.catalog() needs pandas: pip install 'emdata[pipeline]'") from exc
    path = (find_root() if root is None else Path(root)) / TABLE_FILE
    if not path.is_file():
        raise NotBuiltError(f"{path}: no such file; run `emdata summarize` in that repository")
    return pd.read_csv(path, dtype={"dataset": str, "accession": str, "doi": str})
