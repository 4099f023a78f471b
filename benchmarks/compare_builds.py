"""Compare two builds of the offline demo, array by array and attribute by attribute.

Used to show that a refactoring keeps the product's bytes: build the demo at two commits with
``python -m emdata demo --keep --workdir DIR`` and run::

    python benchmarks/compare_builds.py DIR_BEFORE DIR_AFTER

For every HDF5 in ``work/producer/data/processed`` it compares every array's bytes (a sha256 of
the data, and the ``array_sha256`` attribute where present), its shape, dtype, chunking and
filters, and every attribute (root, groups, arrays, and the provenance strings). Only two things
may differ between builds and are masked before comparing: the package version
(``emdata_version``) and the replicas' loopback URLs, whose port is chosen at random per run
(``http://127.0.0.1:<port>``); a checksum of a replica response that embeds such a URL is masked
with it, and so is the demo folder's own path. The fetch records (``data/metadata/*.json``) are compared the same way, except their whole-file
``file_sha256``, which follows the masked attributes. Exit status 0
when everything else is identical.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters)
import numpy as np

LOOPBACK = re.compile(r"(https?|s3)://(127\.0\.0\.1|localhost|\[::1\]):\d+")
VOLATILE_ATTRS = {"emdata_version"}


def _mask(value: Any) -> Any:
    """Mask loopback ports, and drop checksums keyed by a loopback URL whose body may embed one."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return LOOPBACK.sub(r"\1://LOOPBACK", value)
        return _mask(parsed) if isinstance(parsed, (dict, list)) else LOOPBACK.sub(r"\1://LOOPBACK", value)
    if isinstance(value, dict):
        return {LOOPBACK.sub(r"\1://LOOPBACK", k): _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _checksums_of_replica_json(attrs: dict[str, Any]) -> dict[str, Any]:
    """JSON API responses carry replica URLs (viewer links), so their checksums vary by port: mask those."""
    sums = attrs.get("source_checksums")
    if isinstance(sums, dict):
        attrs["source_checksums"] = {k: (v if not re.search(r"/api/|/webclient/|\.json$|/entry/", k) else "MASKED")
                                     for k, v in sums.items()}
    return attrs


def describe(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            attrs = _checksums_of_replica_json({k: _mask(v) for k, v in obj.attrs.items() if k not in VOLATILE_ATTRS})
            entry: dict[str, Any] = {"attrs": attrs}
            if isinstance(obj, h5py.Dataset):
                entry.update(shape=obj.shape, dtype=str(obj.dtype), chunks=obj.chunks,
                             filters=sorted(obj._filters.keys()) if hasattr(obj, "_filters") else None)
                if obj.dtype.kind in "OSU" or obj.shape == ():
                    entry["value"] = _mask(obj[()])
                else:
                    digest = hashlib.sha256()
                    for start in range(0, obj.shape[0], 16):
                        digest.update(np.ascontiguousarray(obj[start:start + 16]).tobytes())
                    entry["sha256"] = digest.hexdigest()
            out[name] = entry
        root = _checksums_of_replica_json({k: _mask(v) for k, v in f.attrs.items() if k not in VOLATILE_ATTRS})
        out["/"] = {"attrs": root}
        f.visititems(visit)
    return out


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{where}/{key}: only in {'after' if key in b else 'before'}")
            else:
                _diff(a[key], b[key], f"{where}/{key}", out)
    elif a != b:
        out.append(f"{where}: {str(a)[:160]!r} != {str(b)[:160]!r}")


def _unroot(value: Any, root: Path) -> Any:
    """The demo's own folder appears in local-copy paths (the organoid set): mask it."""
    return json.loads(json.dumps(value, default=str).replace(str(root), "DEMO_ROOT"))


def compare(before: Path, after: Path) -> list[str]:
    problems: list[str] = []
    for sub, pattern in (("data/processed", "*.h5"), ("data/metadata", "*.json")):
        left = {p.name: p for p in (before / "work" / "producer" / sub).glob(pattern)}
        right = {p.name: p for p in (after / "work" / "producer" / sub).glob(pattern)}
        if not left:
            problems.append(f"{before}: no {sub}/{pattern}")
        for name in sorted(set(left) | set(right)):
            if name not in left or name not in right:
                problems.append(f"{sub}/{name}: only in {'after' if name in right else 'before'}")
                continue
            if pattern == "*.h5":
                a, b = describe(left[name]), describe(right[name])
            else:  # the record's whole-file digest follows the masked attributes; the arrays are compared above
                a = _checksums_of_replica_json(_mask(json.loads(left[name].read_text())))
                b = _checksums_of_replica_json(_mask(json.loads(right[name].read_text())))
                a.pop("file_sha256", None)
                b.pop("file_sha256", None)
            _diff(_unroot(a, before), _unroot(b, after), f"{sub}/{name}", problems)
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    problems = compare(Path(argv[0]), Path(argv[1]))
    for line in problems:
        print(line)
    count = len(list((Path(argv[0]) / "work" / "producer" / "data" / "processed").glob("*.h5")))
    print(f"compare_builds: {count} datasets, {len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
