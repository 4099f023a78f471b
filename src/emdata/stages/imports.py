"""Which emdata modules a module runs when it is imported and used, read from the source (ast).

The code fingerprints (:mod:`emdata.stages.codedeps`) follow these imports from a stage's entry
module, so a module a stage uses cannot be left out of its fingerprint by hand. Every import
counts, at module level or inside a function (a lazy import runs too), except the imports under
``if TYPE_CHECKING:``, which never run (the source registry names every kind there for mypy).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Collection

PACKAGE = Path(__file__).resolve().parents[1]


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``emdata.h5`` for its ``__init__``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` (the file ``path``) imports when it runs."""
    stat = path.stat()
    found = set()
    for level, target, names in _imports(str(path), stat.st_mtime_ns, stat.st_size):
        if level < 0:  # ``import a.b``
            candidates = list(names)
        else:  # ``from base import name``: name is a submodule, or a name defined in base itself
            base = _absolute(module, path.name == "__init__.py", level, target)
            candidates = [f"{base}.{name}" if f"{base}.{name}" in known else base for name in names]
        for name in candidates:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known and name != module:
                found.add(name)
    return found


@functools.lru_cache(maxsize=None)
def _imports(path: str, mtime_ns: int, size: int) -> list[tuple[int, str | None, tuple[str, ...]]]:
    """(level, module, names) of each run-time import of a file (level -1: a plain ``import``), parsed once."""
    tree = ast.parse(Path(path).read_text(), path)
    out: list[tuple[int, str | None, tuple[str, ...]]] = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.append((-1, None, tuple(alias.name for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module, tuple(alias.name for alias in node.names)))
    return out


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a (possibly relative) ``from`` import's module."""
    if not level:
        return target or ""
    parts = module.split(".")
    base = parts[: len(parts) - level + is_package]
    return ".".join(base + ([target] if target else []))


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of the module except the bodies of ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_closure(roots: list[str], modules: dict[str, Path], *, stop: Collection[str] = ()) -> set[str]:
    """``roots`` and every module they import, directly or not, with the packages above each one.

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too, so those count as imported.
    A module in ``stop`` is neither included nor followed.
    """
    known = set(modules)
    seen: set[str] = set()
    stack = [m for m in roots if m not in stop]
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]
        for target in [*imported_modules(module, modules[module], known), *parents]:
            if target not in seen and target not in stop and target in known:
                stack.append(target)
    return seen
