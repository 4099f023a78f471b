"""``model_identity``: what tiled inference's ledger stores to recognise a model on a rerun.

Equal only for the same model, so a rerun with a different model starts over instead of keeping
the old model's blocks:

- with ``model_id=`` (e.g. a checkpoint's hash), by that string alone: the caller vouches that the
  same id means the same outputs;
- otherwise by content, never by name: a plain function by its code, defaults, closure values and
  the globals it uses; an object with ``state_dict()`` (a torch module) by its class and *every*
  attribute, recursively: parameters, all buffers (also those registered with
  ``persistent=False``), submodules, the training flag, hooks and plain values such as a scale or
  a threshold. A model holding anything that cannot be hashed (an object without
  ``state_dict()``, a compiled TorchScript module, an open file) is not identified: it gets a
  random identity, so it never resumes, with a warning to pass ``model_id``.

Outside the model object nothing is seen: when outputs also depend on files the model reads,
global settings or library versions, pass ``model_id``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import sys
import sysconfig
import types
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


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
