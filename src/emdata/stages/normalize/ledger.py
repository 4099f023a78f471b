"""The ledger of a distributed normalize: finished tiles staged on disk, so a rerun resumes.

``data/.state/<ds>.normalize/`` holds ``blocks/`` (one staged file per tile: its encoded chunks
and partial statistics) and ``ledger.jsonl`` (the run's fingerprint, then one line per finished
tile). A published output removes the staged tiles and keeps the lines as
``data/.state/<ds>.normalize-ledger.jsonl`` (see :mod:`emdata.stages.normalize.distributed`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from emdata.core.atomic import stale_temporaries_in, write_bytes_atomic
from emdata.h5.chunks import EncodedChunk

log = logging.getLogger(__name__)
BLOCK_MAGIC = b"EMDBLK01"


def ledger_dir(cfg: Any, key: str) -> Path:
    """``data/.state/<key>.normalize``: staged tiles and the ledger (local working state, never versioned)."""
    return cfg.hash_state_path(key).with_name(f"{key}.normalize")


def last_ledger_path(cfg: Any, key: str) -> Path:
    """``data/.state/<key>.normalize-ledger.jsonl``: the ledger of the last distributed run that published."""
    return cfg.hash_state_path(key).with_name(f"{key}.normalize-ledger.jsonl")


def discard_ledger(cfg: Any, key: str, *, keep_log: bool = False) -> None:
    """A published output makes the staged tiles obsolete; the ledger's lines (which worker encoded
    which tile in which run, and how long it took) are kept as the last run's log."""
    folder = ledger_dir(cfg, key)
    if folder.exists():
        if keep_log and (folder / "ledger.jsonl").is_file():
            os.replace(folder / "ledger.jsonl", last_ledger_path(cfg, key))
        shutil.rmtree(folder, ignore_errors=True)


def slug(array: str) -> str:
    """An array's name as one path component (``labels/mito`` -> ``labels__mito``)."""
    return array.replace("/", "__")


class Ledger:
    """Finished tiles of one dataset: a staged file per tile and one JSON line each in ``ledger.jsonl``.

    The first line holds the fingerprint (inputs, settings, code); a ledger with another
    fingerprint is discarded. A tile counts as finished when its line is there and its staged
    file has the recorded size (the file is renamed into place before the line is written).
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.path = folder / "ledger.jsonl"
        self.run = uuid.uuid4().hex[:12]
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            try:
                head = json.loads(lines[0]) if lines else {}
            except ValueError:
                head = {}
            if head.get("fingerprint") != fingerprint:
                log.info("%s: inputs, settings or code changed since the interrupted run; starting over", folder)
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for line in lines[1:]:
                    try:
                        entry = json.loads(line)
                    except ValueError:  # a line cut by a kill: that tile is simply not done
                        continue
                    staged = self.staged(entry["array"], entry["tile"])
                    if staged.is_file() and staged.stat().st_size == entry["bytes"]:
                        self.done[(entry["array"], entry["tile"])] = entry
        for old in stale_temporaries_in(folder):  # tiles a killed run was writing (we hold the dataset's lock)
            old.unlink(missing_ok=True)
        (folder / "blocks").mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            write_bytes_atomic(self.path, (json.dumps({"fingerprint": fingerprint}) + "\n").encode())
        self._lock = threading.Lock()

    def staged(self, array: str, tile: int) -> Path:
        return self.folder / "blocks" / slug(array) / f"{tile:08d}.blk"

    def entries(self) -> list[dict[str, Any]]:
        """Every tile line of the ledger file, in the order written (all runs)."""
        return [json.loads(line) for line in self.path.read_text().splitlines()[1:] if line.strip()]

    def stage(self, array: str, tile: int, result: dict[str, Any]) -> None:
        data = pack_block(result)
        write_bytes_atomic(self.staged(array, tile), data)  # a killed process leaves no half tile
        entry = {"array": array, "tile": tile, "bytes": len(data), "run": self.run,
                 "worker": result.get("worker"), "seconds": round(float(result.get("seconds", 0.0)), 4)}
        with self._lock, open(self.path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
        self.done[(array, tile)] = entry

    def load(self, array: str, tile: int) -> dict[str, Any]:
        return unpack_block(self.staged(array, tile).read_bytes())


def pack_block(result: dict[str, Any]) -> bytes:
    """One staged tile: magic, header length, JSON header, histogram, label counts, chunk payloads."""
    stats = dict(result["stats"] or {})
    hist = stats.pop("hist", None)
    fg = result.get("foreground")
    header = {"stats": stats, "empty": result["stats"] is None,
              "hist": None if hist is None else int(hist.size),
              "foreground": None if fg is None else list(fg.shape),
              "chunks": [[list(off), int(mask), len(data)] for off, mask, data in result["chunks"]]}
    text = json.dumps(header, sort_keys=True).encode()
    parts = [BLOCK_MAGIC, len(text).to_bytes(8, "little"), text]
    if hist is not None:
        parts.append(np.ascontiguousarray(hist, "<i8").tobytes())
    if fg is not None:
        parts.append(np.ascontiguousarray(fg, "<i8").tobytes())
    parts.extend(data for _, _, data in result["chunks"])
    return b"".join(parts)


def unpack_block(blob: bytes) -> dict[str, Any]:
    """A staged tile read back: its statistics, label counts and encoded chunks (views into ``blob``)."""
    if blob[:8] != BLOCK_MAGIC:
        raise ValueError("not a staged emdata tile")
    n = int.from_bytes(blob[8:16], "little")
    header = json.loads(blob[16:16 + n])
    pos = 16 + n
    stats: dict[str, Any] | None = None if header["empty"] else dict(header["stats"])
    if header["hist"] is not None:
        hist = np.frombuffer(blob, "<i8", header["hist"], pos).astype(np.int64)
        pos += 8 * header["hist"]
        assert stats is not None
        stats["hist"] = hist
    fg = None
    if header["foreground"] is not None:
        count = int(np.prod(header["foreground"]))
        fg = np.frombuffer(blob, "<i8", count, pos).reshape(header["foreground"]).astype(np.int64)
        pos += 8 * count
    chunks = []
    view = memoryview(blob)  # chunk payloads are views into the one staged blob, not copies
    for off, mask, length in header["chunks"]:
        chunks.append(EncodedChunk(tuple(off), mask, view[pos:pos + length]))
        pos += length
    if pos != len(blob):
        raise ValueError("staged tile has the wrong length")
    return {"stats": stats, "foreground": fg, "chunks": chunks}
