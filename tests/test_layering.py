"""The layers are the import graph: a check over every module's AST.

* ``tally.core`` is pure computation: it never imports ``tally.service``,
  neither by an import statement nor by a string (``import_module``,
  ``__import__``);
* the product (``tally.core``, ``tally.service``, ``tally``) never imports
  ``tally.bench``;
* no import loops between modules (imports inside functions included: a
  lazy import hides a loop from Python, not from the design).

The test walks the source folders the package is built from (setup.py maps
``core/`` to ``tally.core``, ``service/`` to ``tally.service`` ...), and is
itself checked against a planted violation.
"""
import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"tally": "tally", "tally.core": "core", "tally.service": "service",
           "tally.bench": "bench"}


def module_sources(root=ROOT, folders=FOLDERS):
    """{module name: source path} of every .py and .pyx file of the package."""
    modules = {}
    for package, folder in folders.items():
        base = root / folder
        for path in sorted(base.rglob("*")):
            if path.suffix not in (".py", ".pyx") or "build" in path.parts:
                continue
            relative = path.relative_to(base).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            modules[".".join([package] + parts)] = path
    return modules


def imported_names(path, module):
    """Every module name ``path`` imports: statements, relative imports,
    ``import_module("...")`` and ``__import__("...")`` strings."""
    text = path.read_text()
    if path.suffix == ".pyx":          # Cython: keep the Python-level imports only
        text = "\n".join(line for line in text.splitlines()
                         if line.startswith(("import ", "from ")) and " cimport " not in line)
    tree = ast.parse(text)
    names = set()
    package = module.rsplit(".", 1)[0] if not path.name.startswith("__init__") else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            function = node.func
            called = function.attr if isinstance(function, ast.Attribute) else \
                getattr(function, "id", None)
            if called in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return {n for n in names if n == "tally" or n.startswith("tally.")}


def import_graph(root=ROOT, folders=FOLDERS):
    """{module: set of project modules it imports} (names resolved to modules)."""
    modules = module_sources(root, folders)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in modules:      # 'pkg.mod.Class' -> 'pkg.mod'
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def layer_violations(graph):
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith("tally.core") and target.startswith("tally.service"):
                found.append(f"{module} imports {target}: core must not import the service")
            if not module.startswith("tally.bench") and target.startswith("tally.bench"):
                found.append(f"{module} imports {target}: the product must not import bench")
    return found


def import_cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            # a package importing its own submodules (re-exports) is not a loop
            if len(component) > 1 and not _package_reexport(component, graph):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _package_reexport(component, graph):
    """A cycle made only of a package's ``__init__`` and its own submodules."""
    packages = [m for m in component if all(o == m or o.startswith(m + ".") for o in component)]
    return bool(packages)


def test_core_never_imports_the_service_and_the_product_never_imports_bench():
    assert layer_violations(import_graph()) == []


def test_no_import_loops():
    assert import_cycles(import_graph()) == []


def test_the_checks_catch_planted_violations(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "service").mkdir()
    (tmp_path / "core" / "a.py").write_text(
        "import importlib\n\ndef f():\n    importlib.import_module('tally.service.b')\n")
    (tmp_path / "core" / "c.py").write_text("def g():\n    from tally.core import d\n")
    (tmp_path / "core" / "d.py").write_text("from tally.core.c import g\n")
    (tmp_path / "service" / "b.py").write_text("from tally.bench import x\n")
    graph = import_graph(tmp_path, {"tally.core": "core", "tally.service": "service",
                                    "tally.bench": "bench"})
    violations = layer_violations(graph)
    assert any("tally.core.a imports tally.service.b" in v for v in violations)
    assert import_cycles(graph) == [["tally.core.c", "tally.core.d"]]
    # a bench module that does not exist is still a product -> bench import
    graph["tally.service.b"].add("tally.bench")
    assert any("tally.service.b imports tally.bench" in v for v in layer_violations(graph))


@pytest.mark.parametrize("folder", ["core", "service"])
def test_no_module_over_600_lines_without_a_reason(folder):
    """Long modules say why in their docstring ("Long because ...")."""
    long = []
    for path in (ROOT / folder).rglob("*.py"):
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > 600 and "Long because" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{os.path.relpath(path, ROOT)}: {len(lines)} lines")
    assert long == []


def test_the_public_face_exports_what_it_declares():
    import tally
    stubs = (ROOT / "tally" / "__init__.pyi").read_text()
    for name in tally.__all__:
        assert getattr(tally, name) is not None
        assert f"as {name}\n" in stubs, f"{name} has no type stub"
