"""The package's shape: one face over two backends, no import cycles.

Imports are read from the source (``ast``), module level and inside functions
alike, so a lazy import counts as much as an eager one.
"""
import ast
import inspect
import pathlib

import pytest

import nbbn
from nbbn import _backend

PACKAGE = pathlib.Path(nbbn.__file__).parent
FACE = {"nbbn.stats", "nbbn.batchnorm", "nbbn.layer"}
PUBLIC_NAMES = set(nbbn.__all__) | {"var_or_std", "layer_to_device"}


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name, path, modules):
    """The nbbn modules that module ``name`` imports (not the packages it implicitly loads)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports mod; "from mod import name" imports mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest prefix that is an nbbn module ("from . import x" names module x)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles(graph):
    cycles = sorted(name for name in graph if name in _reachable(graph, name)
                    and name != "nbbn")  # every submodule's parent package is loaded anyway
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_backends_do_not_import_the_face_or_the_router(graph):
    forbidden = FACE | {"nbbn._dispatch", "nbbn", "nbbn.distributed", "nbbn.torch"}
    for name in graph:
        if name.startswith(("nbbn._cpu", "nbbn._cuda")):
            assert not (_reachable(graph, name) & forbidden), (name, _reachable(graph, name))


def test_the_face_imports_no_kernels(graph):
    for name in FACE | {"nbbn._dispatch"}:
        kernels = {m for m in graph[name] if m.startswith(("nbbn._cpu.", "nbbn._cuda."))}
        allowed = {"nbbn._cpu.backend", "nbbn._cuda.backend"} if name == "nbbn._dispatch" \
            else set()
        assert kernels <= allowed, (name, kernels)


@pytest.mark.parametrize("backend_name", ["nbbn._cpu.backend", "nbbn._cuda.backend"])
def test_each_backend_implements_every_stage(backend_name):
    if backend_name == "nbbn._cuda.backend":
        pytest.importorskip("numba.cuda")
    import importlib
    backend = importlib.import_module(backend_name)
    stages = {n: f for n, f in vars(_backend.Backend).items()
              if callable(f) and not n.startswith("_")}
    assert len(stages) > 15
    for name, proto in stages.items():
        impl = getattr(backend, name, None)
        assert callable(impl), f"{backend_name} lacks the stage {name}"
        want = list(inspect.signature(proto).parameters)[1:]  # without self
        assert list(inspect.signature(impl).parameters) == want, (backend_name, name)


def test_the_device_backend_defines_no_public_function():
    for path in (PACKAGE / "_cuda").glob("*.py"):
        tree = ast.parse(path.read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert not defined & PUBLIC_NAMES, (path.name, defined & PUBLIC_NAMES)
