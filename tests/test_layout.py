"""The package's imports form layers: no import circle, the blocking core below the rest
and entered through one door, and in the core a folder per backend that no other
backend reaches into.

The door: a module outside ``taskrunners._core`` (the rest of ``taskrunners/``,
``compat/``, ``benchmarks/``) imports no core module but ``taskrunners._core.seam``.
The tests themselves are not read: they may import core internals, to test them.

The imports are read from the source with :mod:`ast`: every ``import`` and
``from ... import`` anywhere in a module, at its top, inside a function or under
``if TYPE_CHECKING:`` alike (a circle through type hints alone is still a circle a
reader follows; a protocol naming what is needed breaks it). Relative imports are
resolved. ``from package import name`` is an import of ``package.name`` when that is a
module, else of ``package`` itself. A module's package ``__init__`` running first is
not counted as an import of it, and names imported through ``importlib`` are not read.

The modules are those of ``taskrunners/`` (with ``compat/`` read as
``taskrunners.compat``, the package it is linked into) and of ``benchmarks/``.
"""

from __future__ import annotations

import ast
import collections
import pathlib
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

from tests.support import ROOT

#: Where each top-level package's modules are read from.
PACKAGES = {
    "taskrunners": ROOT / "taskrunners",
    "taskrunners.compat": ROOT / "compat",
    "benchmarks": ROOT / "benchmarks",
}

#: The layers above the blocking core: nothing in ``taskrunners._core`` may reach one
#: of these, directly or through the modules it imports (the models it may import,
#: ``taskrunners.states`` and ``taskrunners._collections``, must not reach them either).
ABOVE_CORE = (
    "taskrunners.futures",
    "taskrunners.task_runners",
    "taskrunners.flows",
    "taskrunners.tasks",
    "taskrunners._flow_engine",
    "taskrunners._task_runs",
    "taskrunners.sync",
    "taskrunners.compat",
)
CORE = "taskrunners._core"
#: The one core module that modules outside the core may import.
SEAM = "taskrunners._core.seam"

#: The core's folders: one per backend, and ``remote`` for what the process-based ones
#: share. No core module imports a backend's folder from outside it, and ``local``
#: (the in-process runners) imports nothing of ``remote``. What every runner shares
#: sits at the top of the core; the seam, the door, gathers every backend's runner
#: for the layers above.
BACKEND_FOLDERS = ("local", "parallel", "dask", "ray")
REMOTE_FOLDER = "remote"

Graph = Dict[str, Set[str]]


def module_files() -> Dict[str, Tuple[pathlib.Path, bool]]:
    """Every module by dotted name: its file, and whether it is a package's ``__init__``."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            if package == "taskrunners" and relative.parts[0] == "compat":  # read from compat/
                continue
            parts = list(relative.parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _resolve(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    """The absolute name of a relative import ``from <level dots><name> import ...``."""
    base = module.split(".")
    base = base if is_package else base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: pathlib.Path, is_package: bool, known: Set[str]) -> Iterator[str]:
    """The modules of ``known`` that ``module`` imports, anywhere in its source."""
    for target, _ in import_lines(module, path, is_package, known):
        yield target


def import_lines(
    module: str, path: pathlib.Path, is_package: bool, known: Set[str]
) -> Iterator[Tuple[str, int]]:
    """Each module of ``known`` that ``module`` imports, with the line of the import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                for target in _known_prefix(alias.name, known):
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve(module, is_package, node.level, node.module)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    yield submodule, node.lineno
                else:
                    for target in _known_prefix(source, known):
                        yield target, node.lineno


def _known_prefix(name: str, known: Set[str]) -> Iterator[str]:
    """``name``, or the longest package of it that is a known module (if any)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            yield candidate
            return
        parts.pop()


def import_graph() -> Graph:
    """Each module of the packages: the modules of the packages it imports."""
    files = module_files()
    known = set(files)
    return {
        module: set(imports_of(module, path, is_package, known)) - {module}
        for module, (path, is_package) in files.items()
    }


def strongly_connected(graph: Graph) -> List[Set[str]]:
    """The groups of modules that reach each other (Tarjan's algorithm, no recursion)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[Set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
    return [group for group in groups if len(group) > 1]


def shortest_path(graph: Graph, start: str, goal: str, within: Optional[Set[str]] = None) -> List[str]:
    """The shortest chain of imports from ``start`` to ``goal`` (empty if none)."""
    came_from: Dict[str, Optional[str]] = {start: None}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = []
            step: Optional[str] = node
            while step is not None:
                path.append(step)
                step = came_from[step]
            return path[::-1]
        for target in sorted(graph[node]):
            if target not in came_from and (within is None or target in within):
                came_from[target] = node
                queue.append(target)
    return []


def cycles(graph: Graph) -> List[List[str]]:
    """Circles that, together, take every import inside each group of modules reaching
    each other: for each such import ``a -> b``, the shortest way back from b to a."""
    found: Dict[Tuple[str, ...], List[str]] = {}
    for group in strongly_connected(graph):
        for source in sorted(group):
            for target in sorted(graph[source] & group):
                back = shortest_path(graph, target, source, within=group)
                circle = [source, *back]
                # The same circle entered at another module is the same circle.
                turn = circle[:-1].index(min(circle[:-1]))
                canonical = circle[turn:-1] + circle[:turn] + [circle[turn]]
                found.setdefault(tuple(canonical), canonical)
    return sorted(found.values())


def test_the_import_graph_is_read():
    graph = import_graph()
    # A few imports every version of the package has: the reader is not blind.
    assert "taskrunners._core.calls" in graph["taskrunners._core.base"]
    assert "taskrunners.states" in graph["taskrunners._core.calls"]
    assert "taskrunners._core.seam" in graph["taskrunners.compat.futures"]
    assert "benchmarks.engines" in graph["benchmarks.cli"]
    assert "taskrunners.sync" in graph["taskrunners.task_runners"]  # from taskrunners import sync
    # The layers the core must not reach exist.
    assert set(ABOVE_CORE) <= set(graph)


def test_reading_finds_circles_through_any_kind_of_import(tmp_path):
    source = {
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "def f():\n    from . import c\n",
        "c.py": "from .a import A\n",
        "d.py": "import pkg.a\n",
    }
    for name, text in source.items():
        (tmp_path / name).write_text(text)
    known = {f"pkg.{name[:-3]}" for name in source}
    graph = {
        f"pkg.{name[:-3]}": set(imports_of(f"pkg.{name[:-3]}", tmp_path / name, False, known))
        for name in source
    }
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_no_import_circles():
    found = cycles(import_graph())
    if found:
        pytest.fail("Import circles:\n" + "\n".join("  " + " -> ".join(circle) for circle in found))


def test_the_core_reaches_no_layer_above_it():
    graph = import_graph()
    core = [module for module in graph if module == CORE or module.startswith(CORE + ".")]
    # One search from every core module at once: the shortest way up to each layer.
    came_from: Dict[str, Optional[str]] = dict.fromkeys(core)
    queue = collections.deque(sorted(core))
    while queue:
        node = queue.popleft()
        for target in sorted(graph[node]):
            if target not in came_from:
                came_from[target] = node
                queue.append(target)
    wrong = []
    for above in ABOVE_CORE:
        if above in came_from:
            path = [above]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            wrong.append(" -> ".join(reversed(path)))
    if wrong:
        pytest.fail("The blocking core imports a layer above it:\n" + "\n".join("  " + path for path in wrong))


def _core_folder(module: str) -> Optional[str]:
    """The folder of the core that ``module`` is in (None at the core's top, or outside it)."""
    parts = module.split(".")
    return parts[2] if module.startswith(CORE + ".") and len(parts) > 3 else None


def test_the_core_folders_show_the_design():
    graph = import_graph()
    folders = {_core_folder(module) for module in graph} - {None}
    assert folders == {*BACKEND_FOLDERS, REMOTE_FOLDER}, folders
    wrong = []
    for module in sorted(graph):
        if not (module == CORE or module.startswith(CORE + ".")) or module == SEAM:
            continue
        here = _core_folder(module)
        for target in sorted(graph[module]):
            there = _core_folder(target)
            if there is None or there == here:
                continue
            if there in BACKEND_FOLDERS or (there == REMOTE_FOLDER and here == "local"):
                wrong.append(f"{module} -> {target}")
    if wrong:
        pytest.fail("A core module imports another backend's folder:\n" + "\n".join("  " + w for w in wrong))


def _in_core(module: str) -> bool:
    return module == CORE or module.startswith(CORE + ".")


def doors_broken(files: Dict[str, Tuple[pathlib.Path, bool]]) -> List[str]:
    """Every import of a core module other than the seam by a module outside the core:
    ``"<file>:<line>: <module> imports <core module>"``."""
    known = set(files)
    wrong = []
    for module, (path, is_package) in sorted(files.items()):
        if _in_core(module):
            continue
        for target, line in import_lines(module, path, is_package, known):
            if _in_core(target) and target != SEAM:
                wrong.append(f"{path.relative_to(path.parents[1])}:{line}: {module} imports {target}")
    return sorted(set(wrong))


def test_the_core_has_one_door():
    wrong = doors_broken(module_files())
    if wrong:
        pytest.fail(
            f"Outside {CORE}, modules import the core only through {SEAM}:\n"
            + "\n".join("  " + w for w in wrong)
        )


def test_the_door_check_reads_every_kind_of_import(tmp_path):
    core = tmp_path / "taskrunners" / "_core"
    core.mkdir(parents=True)
    source = {
        "taskrunners/__init__.py": "",
        "taskrunners/_core/__init__.py": "",
        "taskrunners/_core/seam.py": "from taskrunners._core import calls\n",
        "taskrunners/_core/calls.py": "",
        "taskrunners/lazy.py": "def f():\n    from taskrunners._core.calls import Call\n",
        "taskrunners/hinted.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import taskrunners._core.calls\n"
        ),
        "taskrunners/relative.py": "from ._core import calls, seam\n",
        "taskrunners/fine.py": "from taskrunners._core import seam\nfrom taskrunners._core.seam import X\n",
    }
    files = {}
    for name, text in source.items():
        path = tmp_path / name
        path.write_text(text)
        parts = name[:-3].split("/")
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    assert doors_broken(files) == [
        "taskrunners/hinted.py:3: taskrunners.hinted imports taskrunners._core.calls",
        "taskrunners/lazy.py:2: taskrunners.lazy imports taskrunners._core.calls",
        "taskrunners/relative.py:1: taskrunners.relative imports taskrunners._core.calls",
    ]
