"""Where the project is (:func:`find_root`) and where each dataset's files live under ``data/``
(dvc.yaml uses the same paths).

:class:`Layout` answers for any dataset key of a project; :class:`DatasetPaths` is one dataset's
answers, taken once when a command resolves its dataset and handed down with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from emdata.errors import ConfigError
from emdata.params.schema import PARAMS_FILE


def find_root(start: Path | None = None) -> Path:
    """The project folder: ``$EMDATA_PROJECT``, else the nearest parent holding params.yaml."""
    env = os.environ.get("EMDATA_PROJECT")
    if env:
        root = Path(env).resolve()
        if not (root / PARAMS_FILE).is_file():
            raise ConfigError(f"EMDATA_PROJECT={env}: no {PARAMS_FILE} there")
        return root
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(
        f"no {PARAMS_FILE} in {here} or its parents; run inside an emdata repository or set EMDATA_PROJECT"
    )


TABLE_FILE = "data/metadata.csv"  # one row per dataset: stages.table writes it, access.catalog reads it


def processed_relpath(key: str) -> str:
    """Where normalize writes a dataset's HDF5, relative to the repository (dvc.yaml agrees)."""
    return f"data/processed/{key}.h5"


@dataclass(frozen=True)
class DatasetPaths:
    """Every place fetch and normalize read or write for one dataset."""

    key: str
    root: Path  # the repository
    raw: Path  # data/raw/<key>: what fetch published
    partial: Path  # data/raw/.partial/<key>: a fetch under way (kept across interruptions)
    processed: Path  # data/processed/<key>.h5
    record: Path  # data/metadata/<key>.json
    hash_state: Path  # local cache of verified raw-file hashes; never versioned
    input_stamp: Path  # the stamp of a local import's files at its last fetch; never versioned
    locks: Path  # the folder of every dataset's lock file


@dataclass(frozen=True)
class Layout:
    root: Path

    def raw_dir(self, key: str) -> Path:
        return self.root / "data" / "raw" / key

    def lock_dir(self) -> Path:
        return self.root / "data" / ".locks"

    def hash_state_path(self, key: str) -> Path:
        """Local cache of verified raw-file hashes (sources.fetch.record.HashState); never versioned."""
        return self.root / "data" / ".state" / f"{key}.json"

    def partial_dir(self, key: str) -> Path:
        return self.root / "data" / "raw" / ".partial" / key

    def processed_path(self, key: str) -> Path:
        return self.root / processed_relpath(key)

    def record_path(self, key: str) -> Path:
        return self.root / "data" / "metadata" / f"{key}.json"

    def input_stamp_path(self, key: str) -> Path:
        """The stamp of a local import's files at its last fetch (local state, never versioned)."""
        return self.root / "data" / ".state" / f"{key}.input_stamp.json"

    def inputs_dir(self) -> Path:
        """What DVC cannot see of each source (``emdata.stages.inputs``); fetch@<ds> depends on one file."""
        return self.root / "data" / "inputs"

    def paths(self, key: str) -> DatasetPaths:
        return DatasetPaths(key=key, root=self.root, raw=self.raw_dir(key), partial=self.partial_dir(key),
                            processed=self.processed_path(key), record=self.record_path(key),
                            hash_state=self.hash_state_path(key), input_stamp=self.input_stamp_path(key),
                            locks=self.lock_dir())
