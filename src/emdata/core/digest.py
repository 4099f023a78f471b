"""File checksums, without the network stack (importing this loads neither requests nor h5py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 8 << 20


def sha256_file(path: Path, block: int = BLOCK) -> str:
    """sha256 of a file, read in large blocks (hashlib releases the GIL on them)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()
