"""Tiled inference: run a function over blocks with halo, blend, write a chunk-aligned HDF5.

``run_tiled(volume, fn, out_path, block_shape=..., halo=..., blend=...)`` calls ``fn`` on each
block's read region (``block_shape + 2 * halo`` voxels, padded at the borders) and expects an
array of the same spatial shape back (a same-size network). Blending:

- ``crop``: keep each block's centre (its write region); the halo only gives context.
- ``average`` / ``gaussian``: every output voxel is the weighted mean of all windows covering it
  (uniform weights, or a Gaussian with sigma = 1/8 of the window, as nnU-Net does).

The output dataset has chunks equal to ``block_shape`` and each block writes whole chunks, with
the input's resolution and offset. Work is resumable: a ledger of finished blocks lives in a
scratch file beside the output (``<out>.tiling.h5``; it also holds the window predictions of the
blend modes), so a rerun after an interruption computes only the missing blocks. The output is
written as ``.<name>.partial`` and renamed when complete; the scratch file is then removed.

The ledger is keyed by the input, the settings and the *model*, so a rerun with a different model
starts over instead of keeping the old model's blocks. How the model is recognised:

- with ``model_id=`` (e.g. a checkpoint's hash), by that string alone: the caller vouches that the
  same id means the same outputs;
- otherwise by content, never by name (see ``model_identity``): a plain function by its code,
  defaults, closure values and the globals it uses; an object with ``state_dict()`` (a torch
  module) by its class and *every* attribute, recursively: parameters, all buffers (also those
  registered with ``persistent=False``), submodules, the training flag, hooks and plain values
  such as a scale or a threshold. A model holding anything that cannot be hashed (an object
  without ``state_dict()``, a compiled TorchScript module, an open file) is not identified: it
  never resumes (every run computes every block, with a warning) unless ``model_id`` is given.

Outside the model object nothing is seen: when outputs also depend on files the model reads,
global settings or library versions, pass ``model_id``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import types
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from emdata.access.blocks import Block, block_grid, parse_triple, triple
from emdata.access.cluster import predict_on_cluster
from emdata.access.padding import PAD_MODES
from emdata.access.predict import predict_block
from emdata.access.volume import Volume
from emdata.core.progress import Progress
from emdata.errors import ConfigError
from emdata.h5 import hdf5

log = logging.getLogger(__name__)
BLENDS = ("crop", "average", "gaussian")


def window_weights(shape: tuple[int, ...], blend: str) -> np.ndarray:
    """Per-voxel weights of one window (float64, strictly positive)."""
    if blend == "average":
        return np.ones(shape, np.float64)
    axes = []
    for n in shape:
        sigma = max(n / 8.0, 1e-6)
        x = np.arange(n) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-6)  # never 0: every covered voxel gets a value


def _fingerprint(volume: Volume, block: tuple[int, ...], halo: tuple[int, ...], blend: str, dtype: np.dtype,
                 pad: str, model: dict[str, str]) -> str:
    return json.dumps({
        "input": volume.identity(), "array": volume.array, "shape": list(volume.shape),
        "array_sha256": str(volume.attrs.get("array_sha256", "")), "block": list(block), "halo": list(halo),
        "blend": blend, "dtype": np.dtype(dtype).str, "pad": pad, "model": model,
    }, sort_keys=True)


def _changes(old: Any, new: str) -> str:
    """Which fingerprint fields differ, for the log ("model, halo"), or "" if unknown."""
    try:
        before, after = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return ""
    return ", ".join(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))


class _Opaque(Exception):
    """Part of a model whose state cannot be hashed."""


def _qualified_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or ''}.{getattr(obj, '__qualname__', None) or type(obj).__qualname__}"


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(sorted({os.path.realpath(d) + os.sep for d in dirs}))


def _is_library_file(filename: str | None) -> bool:
    """Installed code (standard library, site-packages, frozen or built-in) is identified by its name."""
    if not filename:
        return True
    if filename.startswith("<"):
        return filename.startswith("<frozen")  # "<string>", "<stdin>", notebook cells: user code
    return os.path.realpath(filename).startswith(_library_dirs())


def _is_library_module(name: str | None) -> bool:
    module = sys.modules.get(name or "")
    return module is None or _is_library_file(getattr(module, "__file__", None))


def _is_tensor(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach") and hasattr(obj, "dtype")


class _ModelHasher:
    """SHA-256 of what a model's outputs depend on; raises ``_Opaque`` for state it cannot see.

    Plain values, numpy arrays and tensors are hashed by value; user functions by their code
    (``co_code``, constants recursively, names, argument layout), defaults, closure cells and the
    module globals their code names; classes from user code by their attributes and methods;
    objects with ``state_dict()`` by class and every attribute, recursively (see ``_stateful``).
    Installed code (standard library, site-packages, built-ins) is identified by its qualified name.
    """

    _DUNDER_SKIP = frozenset({"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__", "__annotations__"})

    _BUILTINS = (types.BuiltinFunctionType, types.WrapperDescriptorType, types.MethodDescriptorType,
                 types.ClassMethodDescriptorType, types.MethodWrapperType, np.ufunc)

    def __init__(self) -> None:
        # id -> (object, digest): the object is kept so that its id is not reused by a later temporary
        self._memo: dict[int, tuple[Any, bytes]] = {}
        self._active: set[int] = set()

    def digest(self, obj: Any) -> str:
        return self._value(obj).hex()

    @staticmethod
    def _hash(tag: str, *parts: bytes) -> bytes:
        h = hashlib.sha256(tag.encode())
        for part in parts:
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.digest()

    def _value(self, obj: Any) -> bytes:
        if obj is None or obj is Ellipsis or isinstance(obj, (bool, int, float, complex, str)):
            return self._hash(type(obj).__name__, repr(obj).encode())
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return self._hash("bytes", bytes(obj))
        key = id(obj)
        if key in self._memo:
            return self._memo[key][1]
        if key in self._active:  # a cycle (a recursive function, a module referring to itself)
            return self._hash("cycle", _qualified_name(obj).encode())
        self._active.add(key)
        try:
            digest = self._compound(obj)
        finally:
            self._active.discard(key)
        self._memo[key] = (obj, digest)
        return digest

    def _compound(self, obj: Any) -> bytes:
        v = self._value
        if isinstance(obj, (tuple, list)):
            return self._hash(type(obj).__name__, *map(v, obj))
        if isinstance(obj, (set, frozenset)):
            return self._hash("set", *sorted(map(v, obj)))
        if isinstance(obj, dict):
            return self._hash("dict", *sorted(v(k) + v(x) for k, x in obj.items()))
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return self._hash("object-array", repr(obj.shape).encode(), v(obj.tolist()))
            return self._hash("ndarray", obj.dtype.str.encode(), repr(obj.shape).encode(),
                              np.ascontiguousarray(obj).tobytes())
        if isinstance(obj, np.generic):
            return self._hash("scalar", obj.dtype.str.encode(), obj.tobytes())
        if isinstance(obj, np.dtype):
            return self._hash("dtype", obj.str.encode())
        if _is_tensor(obj):
            t = obj.detach().cpu().contiguous()
            try:  # raw bytes, whatever the dtype (bfloat16 has no numpy equivalent); torch is loaded already
                data = t.reshape(-1).view(sys.modules["torch"].uint8).numpy().tobytes()
            except (RuntimeError, TypeError) as e:
                raise _Opaque(f"a {t.dtype} tensor ({e})") from None
            return self._hash("tensor", str(t.dtype).encode(), repr(tuple(t.shape)).encode(), data)
        if isinstance(obj, types.CodeType):
            return self._code(obj)
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, functools.partial):
            return self._hash("partial", v(obj.func), v(obj.args), v(obj.keywords))
        if isinstance(obj, types.MethodType):
            return self._hash("method", v(obj.__func__), v(obj.__self__))
        if isinstance(obj, types.ModuleType):
            return self._hash("module", obj.__name__.encode())
        if isinstance(obj, self._BUILTINS):  # C code: its name (and the object it is bound to)
            owner = getattr(obj, "__self__", None)
            bound = b"" if owner is None or isinstance(owner, types.ModuleType) else v(owner)
            return self._hash("builtin", _qualified_name(obj).encode(), bound)
        if isinstance(obj, (staticmethod, classmethod)):
            return self._hash(type(obj).__name__, v(obj.__func__))
        if isinstance(obj, property):
            return self._hash("property", v(obj.fget), v(obj.fset), v(obj.fdel))
        if isinstance(obj, type):
            return self._class(obj)
        if isinstance(obj, weakref.ref):  # e.g. torch's LSTM keeps weak references to its weights
            return self._hash("weakref", v(obj()))
        if isinstance(obj, logging.Logger):  # writes logs, does not change outputs
            return self._hash("logger", obj.name.encode())
        if isinstance(obj, enum.Enum):
            return self._hash("enum", v(type(obj)), obj.name.encode())
        if type(obj).__module__ == "torch" and type(obj).__name__ in ("dtype", "device"):
            return self._hash("torch", repr(obj).encode())
        if callable(getattr(obj, "state_dict", None)):
            return self._stateful(obj)
        name = _library_name(obj)
        if name is not None:  # e.g. numpy's dispatching functions (np.clip): a library's own object
            return self._hash("library-object", name.encode())
        raise _Opaque(f"a {_qualified_name(type(obj))} object")

    def _code(self, code: types.CodeType) -> bytes:
        parts = [repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags,
                       code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode(),
                 code.co_code, getattr(code, "co_exceptiontable", b"")]
        return self._hash("code", *parts, *map(self._value, code.co_consts))

    def _function(self, fn: types.FunctionType) -> bytes:
        name = _qualified_name(fn).encode()
        if _is_library_file(fn.__code__.co_filename):
            return self._hash("library-function", name)
        closure = [self._cell(c, fn, n) for n, c in zip(fn.__code__.co_freevars, fn.__closure__ or ())]
        used = sorted(n for n in _names(fn.__code__) if n in fn.__globals__)
        globals_ = [self._value(n) + self._named(fn.__globals__[n], fn, f"global {n!r}") for n in used]
        return self._hash("function", name, self._code(fn.__code__), self._value(fn.__defaults__),
                          self._value(fn.__kwdefaults__), *closure, *globals_)

    def _cell(self, cell: Any, fn: Any, name: str) -> bytes:
        try:
            contents = cell.cell_contents
        except ValueError:  # not assigned yet
            return self._hash("empty-cell")
        return self._named(contents, fn, f"closure variable {name!r}")

    def _named(self, obj: Any, owner: Any, what: str) -> bytes:
        try:
            return self._value(obj)
        except _Opaque as e:
            if str(e).startswith("a "):  # say where the opaque object sits, once
                raise _Opaque(f"{what} of {_qualified_name(owner)} is {e}") from None
            raise

    def _class(self, cls: type) -> bytes:
        name = _qualified_name(cls).encode()
        if _is_library_module(cls.__module__):
            return self._hash("library-class", name)
        members = [self._value(k) + self._named(x, cls, f"attribute {k!r}") for k, x in sorted(vars(cls).items())
                   if k not in self._DUNDER_SKIP and not isinstance(x, (types.GetSetDescriptorType,
                                                                      types.MemberDescriptorType))]
        bases = [self._value(b) for b in cls.__bases__ if b is not object]
        return self._hash("class", name, *bases, *members)

    def _stateful(self, obj: Any) -> bytes:
        """An object with ``state_dict()`` (a torch module) by its class and its whole instance state.

        ``state_dict()`` alone misses what also changes outputs: plain attributes (a scale, a
        threshold), buffers registered with ``persistent=False``, the training flag, hooks. So
        every attribute is hashed, recursively (submodules, parameters and buffers are attributes
        of torch modules); one that cannot be hashed makes the model unidentified.
        """
        state = getattr(obj, "__dict__", None)
        if not isinstance(state, dict) or getattr(type(obj), "__slots__", None):
            raise _Opaque(f"a {_qualified_name(type(obj))} object (state outside its __dict__)")
        attributes = [self._value(k) + self._named(x, obj, f"attribute {k!r}") for k, x in sorted(state.items())]
        return self._hash("stateful", self._value(type(obj)), *attributes)


def _library_name(obj: Any) -> str | None:
    """``module.qualname`` if ``obj`` is what that name refers to in an installed module, else None."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or not _is_library_module(module):
        return None
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}.{qualname}" if found is obj else None


def _names(code: types.CodeType) -> set[str]:
    """Global (and attribute) names the code and its nested functions refer to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def model_identity(fn: Callable, model_id: str | None = None) -> dict[str, str]:
    """What the ledger stores to recognise ``fn`` on a rerun: equal only for the same model.

    With ``model_id`` that string alone identifies the model (the caller vouches for it). Otherwise
    ``fn`` is hashed by content (``_ModelHasher``): plain functions and lambdas by code, defaults,
    closure cells and used globals; ``functools.partial``, bound methods, classes and objects with
    ``state_dict()`` (torch modules: their class and all their attributes, recursively: parameters,
    buffers persistent or not, submodules, mode, hooks, plain values) likewise. A callable
    holding other objects cannot be identified: it gets a random identity that matches no other
    run (so nothing is reused) and a warning says to pass ``model_id``.
    """
    if model_id is not None:
        return {"model_id": str(model_id)}
    name = _qualified_name(fn)
    try:
        return {"fn": name, "sha256": _ModelHasher().digest(fn)}
    except _Opaque as e:
        log.warning("tiled inference: cannot identify the model %s (%s); every block is computed and an "
                    "interrupted run will not resume: pass run_tiled(..., model_id=...) to name this exact model",
                    name, e)
        return {"fn": name, "unidentified": uuid.uuid4().hex}


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return np.ascontiguousarray(values, dtype)  # no second copy when the model already gives dtype


def _write_block(target: Any, b: Block, values: np.ndarray) -> None:
    """``target[b.write] = values``; a block that is exactly one chunk goes in as that chunk's bytes
    (the output has no filters), which skips HDF5's selection and conversion machinery."""
    chunks = target.chunks
    if (values.shape == chunks and values.dtype == target.dtype and values.flags.c_contiguous
            and all(start % c == 0 for start, c in zip(b.write_start, chunks))
            and target.id.get_create_plist().get_nfilters() == 0):
        target.id.write_direct_chunk(tuple(b.write_start), values)
    else:
        target[b.write] = values


def run_tiled(volume: Volume, fn: Callable[[np.ndarray], np.ndarray], out_path: str | os.PathLike, *,
              block_shape: tuple[int, int, int], halo: tuple[int, int, int] = (0, 0, 0), blend: str = "crop",
              dtype: np.dtype | type = np.float32, name: str = "prediction", pad: str = "reflect",
              model_id: str | None = None, client: Any = None) -> Path:
    """Run ``fn`` block by block over ``volume`` into ``out_path:/<name>``; return ``out_path``.

    A rerun after an interruption computes only the blocks the ledger lacks, provided the input,
    the settings and the model are the same; otherwise it starts over. The model is recognised by
    content (``model_identity``): a function's code, defaults, closure values and used globals, or
    a torch module's (any ``state_dict()`` object's) class and all of its attributes, recursively
    (tensors, non-persistent buffers, plain values), never by name alone; a model with state that
    cannot be hashed never resumes without ``model_id``.

    Args:
        model_id: names this exact model (e.g. a checkpoint's hash) instead of hashing ``fn``;
            the same id means "same outputs", so change it whenever the model changes. Needed to
            resume with a callable that cannot be hashed (an object without ``state_dict()``
            holding other state); without it such a run computes every block (with a warning).
        client: a ``distributed.Client``: the blocks are predicted on its workers
            (:mod:`emdata.access.cluster`) and this process writes them, with the same ledger,
            blending and output; a lost worker costs only the blocks it held.
    """
    import h5py

    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    if pad not in PAD_MODES:
        raise ConfigError(f"pad must be one of {', '.join(PAD_MODES)}, got {pad!r}")
    out_path = Path(out_path)
    dtype = np.dtype(dtype)
    block = triple(min(b, n) for b, n in zip(parse_triple(block_shape, "block_shape", 1), volume.shape))
    halo = parse_triple(halo, "halo", 0)
    blocks = list(block_grid(volume.shape, block, halo=halo, fit="pad"))
    partial = out_path.with_name(f".{out_path.name}.partial")
    scratch_path = out_path.with_name(out_path.name + ".tiling.h5")
    fingerprint = _fingerprint(volume, block, halo, blend, dtype, pad, model_identity(fn, model_id))
    out_path.parent.mkdir(parents=True, exist_ok=True)

    try:
        scratch_file = h5py.File(scratch_path, "a")
    except OSError:  # damaged by a hard kill mid-write: its ledger cannot be trusted
        log.warning("%s: the ledger %s is unreadable; starting tiled inference over", out_path, scratch_path)
        scratch_path.unlink()
        partial.unlink(missing_ok=True)
        scratch_file = h5py.File(scratch_path, "a")
    with scratch_file as scratch:
        if scratch.attrs.get("fingerprint") != fingerprint or not partial.exists():
            if "done" in scratch:
                changed = _changes(scratch.attrs.get("fingerprint"), fingerprint) if partial.exists() else ""
                log.warning("%s: %s; starting tiled inference over", out_path,
                            f"{changed} changed" if changed else "settings changed or output missing")
            for key in list(scratch):
                del scratch[key]
            scratch.attrs["fingerprint"] = fingerprint
            # Written out, not left to the fill value: HDF5 reuses the space of the ledger just deleted
            # and, without a user fill value, does not clear it, so old flags would come back.
            scratch.create_dataset("done", data=np.zeros(len(blocks), np.uint8))
            scratch.create_dataset("blended", data=np.zeros(len(blocks), np.uint8))
            _create_output(partial, volume, name, block, dtype, blend, halo)
        done = scratch["done"]
        finished = int(np.count_nonzero(done[()]))
        if finished:
            log.info("%s: resuming, %d of %d blocks already done", out_path, finished, len(blocks))
        with h5py.File(partial, "r+") as out:
            target = out[name]
            if blend == "crop":
                _run_crop(volume, fn, blocks, done, target, dtype, pad, scratch, client)
            else:
                _run_blend(volume, fn, blocks, done, scratch, target, dtype, pad, blend, block, halo, client)
    os.replace(partial, out_path)
    scratch_path.unlink()
    return out_path


def _create_output(path: Path, volume: Volume, name: str, block: tuple[int, int, int], dtype: np.dtype, blend: str,
                   halo: tuple[int, ...]) -> None:
    import h5py

    with h5py.File(path, "w") as out:
        dset = out.create_dataset(name, shape=volume.shape, dtype=dtype, chunks=hdf5.chunk_shape(block, volume.shape))
        dset.attrs.update(hdf5.spatial_attrs(tuple(volume.resolution), tuple(volume.offset)))
        dset.attrs["tiling"] = json.dumps({"input": volume.location, "array": volume.array, "blend": blend,
                                           "block_shape": list(block), "halo": list(halo)})


def _crop_cast(b: Block, prediction: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return _cast(b.crop(prediction), dtype)


def _as_is(b: Block, prediction: np.ndarray) -> np.ndarray:
    return prediction


def predictions(volume: Volume, fn: Callable, blocks: list[Block], todo: list[int], pad: str,
                post: Callable[[Block, np.ndarray], np.ndarray], client: Any = None):
    """``(i, post(block i, fn(read region)))`` for each block in ``todo``: here in order, or on the
    workers of ``client`` in the order they finish."""
    if client is not None:
        yield from predict_on_cluster(client, volume, fn, blocks, todo, pad, post)
        return
    for i in todo:
        yield i, post(blocks[i], predict_block(volume, fn, blocks[i], pad))


def _run_crop(volume, fn, blocks, done, target, dtype, pad, scratch, client=None) -> None:
    todo = [i for i in range(len(blocks)) if not done[i]]
    with Progress(len(blocks), "tiled inference", unit="block") as progress:
        progress.update(len(blocks) - len(todo))
        for i, values in predictions(volume, fn, blocks, todo, pad, functools.partial(_crop_cast, dtype=dtype),
                                     client):
            _write_block(target, blocks[i], values)
            target.file.flush()
            done[i] = 1
            scratch.flush()  # the ledger entry follows the data it vouches for
            progress.update(1)


def _run_blend(volume, fn, blocks, done, scratch, target, dtype, pad, blend, block, halo, client=None) -> None:
    window = blocks[0].read_shape
    if "windows" not in scratch:
        scratch.create_dataset("windows", shape=(len(blocks), *window), dtype=np.float32 if dtype.itemsize <= 4
                               else np.float64, chunks=(1, *window))
    windows = scratch["windows"]
    todo = [i for i in range(len(blocks)) if not done[i]]
    with Progress(len(blocks), "tiled inference", unit="block") as progress:
        progress.update(len(blocks) - len(todo))
        for i, prediction in predictions(volume, fn, blocks, todo, pad, _as_is, client):
            windows[i] = prediction
            scratch.flush()
            done[i] = 1
            scratch.flush()
            progress.update(1)
    weights = window_weights(window, blend)
    reach = [math.ceil(h / s) if h else 0 for h, s in zip(halo, block)]
    index_of = {b.index: i for i, b in enumerate(blocks)}
    blended = scratch["blended"]
    for i, b in enumerate(blocks):
        if blended[i]:
            continue
        total = np.zeros(b.write_shape, np.float64)
        weight = np.zeros(b.write_shape, np.float64)
        for dz in range(-reach[0], reach[0] + 1):
            for dy in range(-reach[1], reach[1] + 1):
                for dx in range(-reach[2], reach[2] + 1):
                    j = index_of.get((b.index[0] + dz, b.index[1] + dy, b.index[2] + dx))
                    if j is None:
                        continue
                    w = blocks[j]
                    lo = [max(a, c) for a, c in zip(b.write_start, w.read_start)]
                    hi = [min(a, c) for a, c in zip(b.write_stop, w.read_stop)]
                    if any(h <= l for l, h in zip(lo, hi)):
                        continue
                    in_window = tuple(slice(l - r, h - r) for l, h, r in zip(lo, hi, w.read_start))
                    in_block = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, b.write_start))
                    wt = weights[in_window]
                    total[in_block] += wt * windows[(j,) + in_window]
                    weight[in_block] += wt
        target[b.write] = _cast(total / weight, dtype)
        target.file.flush()
        blended[i] = 1
        scratch.flush()
