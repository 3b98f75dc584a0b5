"""The project's import graph has no cycle, and the architectures never reach up into models/.

Every ``.py`` file of the repository (the library, main.py, benchmarks and the tests; not ``.venv`` nor hidden
folders) is parsed with `ast`, and every import counts, the ones inside functions too: a lazy import delays a
cycle to run time, it does not remove it. ``from pkg import name`` where ``pkg/name.py`` exists is an import of
that submodule; relative imports are resolved against the importing module's package. The implicit import
of a parent package (``import a.b`` runs ``a/__init__.py``) is not an edge: a package's ``__init__`` that
hands on its submodules' names would otherwise close a loop with each of them.

Rules checked:

- no cycle (a strongly connected component of more than one module, or a module importing itself);
- nothing reachable from ``custom_layers/`` or ``custom_architectures/`` lies in ``models/``: an architecture
  builds layers from weights and configs; it neither imports a model wrapper nor a ``utils`` helper that
  does (the path from the architecture to the model is printed);
- no package imports one on a higher floor (`FLOORS`, ARCHITECTURE.md's picture): layers, architectures,
  utils, then the models, then data, then training, then what tests and benchmarks share (``testing/``),
  then the command line, benchmarks and tests;
- only the tests and the benchmarks import ``testing/`` (its PyTorch references are never on a user's path).

The synthetic trees at the end prove that each rule can fail.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("custom_layers", "custom_architectures")
MODELS = "models"
# the floors of the house, bottom first: a package imports its own floor or lower ones only
FLOORS = {"custom_layers": 0, "custom_architectures": 1, "utils": 2, "hparams": 3, "loggers": 3, "models": 3,
          "datasets": 4, "custom_train_objects": 5, "testing": 6, "main": 7, "benchmarks": 7, "unitest": 7}
# what the tests and benchmarks share (tiny models, PyTorch references: torch, transformers, OpenAI's clip):
# only they import it, never the library nor main.py (a user's path)
TEST_SUPPORT = "testing"
TEST_SUPPORT_USERS = ("testing", "benchmarks", "unitest")


def _module_name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root):
    """{module name: path} of every .py file under ``root`` (hidden folders and virtual environments left out)."""
    modules = {}
    for path in sorted(Path(root).rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part.startswith(".") or part in ("venv", "__pycache__") for part in rel[:-1]):
            continue
        modules[_module_name(path, root)] = path
    return modules


def _longest_module(name, modules):
    """The project module ``name`` denotes: itself, else its longest prefix that is one (``a.b.attr`` -> a.b)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module, path, modules):
    """The project modules ``module`` imports, anywhere in the file (functions and classes included)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    is_package = Path(path).name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_longest_module(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: "." is the importing module's package, each further dot one level up
                anchor = package.split(".") if package else []
                anchor = anchor[:len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                found.add(submodule if submodule in modules else _longest_module(base, modules) if base else None)
    found.discard(None)  # not a project module (a self-import is kept: it is a cycle)
    return found


def import_graph(root):
    """{module: set of project modules it imports} for the tree under ``root``."""
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph):
    """The import cycles of ``graph``: its strongly connected components of more than one module, and the
    modules that import themselves (Tarjan's algorithm, iterative), each sorted, in a sorted list."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(start):
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
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
                    if len(component) > 1 or node in graph.get(node, ()):
                        found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _in(module, package):
    return module == package or module.startswith(package + ".")


def upward_imports(graph):
    """``[path]``: for each architecture module that reaches a module of models/, the import path to it."""
    problems = []
    for start in sorted(m for m in graph if any(_in(m, a) for a in ARCHITECTURES)):
        parents, queue = {start: None}, [start]
        while queue:
            node = queue.pop(0)
            for child in sorted(graph.get(node, ())):
                if child not in parents:
                    parents[child] = node
                    queue.append(child)
        for target in sorted(m for m in parents if _in(m, MODELS)):
            path, node = [], target
            while node is not None:
                path.append(node)
                node = parents[node]
            problems.append(path[::-1])
    return problems


def _describe_cycle(component, graph):
    members = set(component)
    return "\n".join(f"  {a} -> {b}" for a in component for b in sorted(graph[a] & members))


# ------------------------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_project_has_no_import_cycle(graph):
    found = cycles(graph)
    assert not found, "import cycles (function-level imports included):\n" + "\n\n".join(
        _describe_cycle(c, graph) for c in found)


def test_architectures_never_reach_models(graph):
    found = upward_imports(graph)
    assert not found, "architectures reaching models/:\n" + "\n".join("  " + " -> ".join(p) for p in found)


def imports_upward(graph, floors=FLOORS):
    """[(importer, imported)] where a module imports a module of a higher floor (or of a package no floor
    names: a new top-level package must be given its floor)."""
    def floor(module):
        return floors.get(module.split(".")[0])

    found = [(a, b) for a, targets in graph.items() for b in targets
             if floor(a) is None or floor(b) is None or floor(b) > floor(a)]
    return sorted(found)


def test_no_package_imports_a_higher_floor(graph):
    found = imports_upward(graph)
    assert not found, "imports that run upward (FLOORS):\n" + "\n".join(f"  {a} -> {b}" for a, b in found)


def imports_of_test_support(graph):
    """[(importer, imported)] where a module outside the tests and benchmarks imports ``testing/``."""
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if _in(b, TEST_SUPPORT) and not any(_in(a, user) for user in TEST_SUPPORT_USERS))


def test_only_tests_and_benchmarks_import_the_test_support(graph):
    found = imports_of_test_support(graph)
    assert not found, "the library imports testing/:\n" + "\n".join(f"  {a} -> {b}" for a, b in found)
    assert any(_in(b, TEST_SUPPORT) for b in graph["unitest.conftest"])  # the rule sees the real users


def test_a_library_import_of_the_test_support_is_found():
    graph = {"main": {"testing.tiny_models"}, "models.x": {"testing"}, "unitest.conftest": {"testing.tiny_models"}}
    assert imports_of_test_support(graph) == [("main", "testing.tiny_models"), ("models.x", "testing")]


def test_an_upward_import_is_found():
    graph = {"utils.cli": {"models.cli_models"}, "models.cli_models": {"utils.cli"}}
    assert imports_upward(graph) == [("utils.cli", "models.cli_models")]
    assert imports_upward({"newpkg.x": {"utils.cli"}}) == [("newpkg.x", "utils.cli")]  # a package without a floor


def test_the_graph_sees_the_project(graph):
    """The walk found the library and its lazy imports (a graph that saw nothing could not fail)."""
    assert {"main", "utils.downloads", "models.image_captioning.clip_cap", "custom_architectures.clip_arch"} <= set(
        graph)
    assert "models.image_captioning.clip_cap" in graph["models.image_captioning"]  # `from .x import` in __init__
    assert "utils.downloads" not in graph["custom_architectures.clip_arch"]


# ------------------------------------------------------------------------------ the rules can fail (tmp trees)


def _tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(root)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    graph = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "class C:\n    def g(self):\n        import pkg.a.thing\n",
        "pkg/d.py": "import pkg.a\n",  # imports into the cycle, is not part of it
        "lone.py": "import lone\n",
    })
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["lone"], ["pkg.a", "pkg.b", "pkg.c"]]


def test_relative_imports_resolve_against_the_package(tmp_path):
    graph = _tree(tmp_path, {
        "top/__init__.py": "from .sub.leaf import X\n",
        "top/sub/__init__.py": "",
        "top/sub/leaf.py": "from .. import other\nfrom ..other import name\nfrom . import sibling\n",
        "top/sub/sibling.py": "",
        "top/other.py": "import os\n",
    })
    assert graph["top"] == {"top.sub.leaf"}
    assert graph["top.sub.leaf"] == {"top.other", "top.sub.sibling"}
    assert graph["top.other"] == set() and cycles(graph) == []


def test_an_architecture_reaching_models_through_utils_is_found(tmp_path):
    graph = _tree(tmp_path, {
        "custom_architectures/__init__.py": "",
        "custom_architectures/arch.py": "def build():\n    from utils.helper import h\n",
        "custom_layers/ok.py": "from utils import light\n",
        "utils/__init__.py": "",
        "utils/helper.py": "def h():\n    from models.wrapper import W\n",
        "utils/light.py": "",
        "models/__init__.py": "",
        "models/wrapper.py": "from custom_architectures import arch\n",
    })
    assert upward_imports(graph) == [["custom_architectures.arch", "utils.helper", "models.wrapper"]]
    assert cycles(graph) == [["custom_architectures.arch", "models.wrapper", "utils.helper"]]
