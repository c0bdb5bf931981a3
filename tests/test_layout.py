"""The house's arrows: no import circle, no arrow running back up, and the library never imports its shells.

The rooms are perl_core's top-level modules and its sub-packages (each folder one room), `bench`
(the lab) and `flows` (the Prefect shell). Between rooms the imports must form no circle: then
every room stands on a floor above all it imports, and no arrow runs back up (a folder that
imports a module which imports the folder again is such a circle, even when its files are not).
perl_core imports neither bench nor flows, bench does not import flows, and perl_core never
imports prefect or mlflow.

Read from the source with `ast` (module-level and in-function imports alike), so a lazy import
that hides a circle from Python's import machinery is still caught.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "perl_core"
TOPS = ("perl_core", "bench", "flows")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str] = frozenset()) -> set[str]:
    """The absolute names `path` imports; relative imports resolved against its module `name`.

    `from pkg import x` names the module `pkg.x` when that is one of `modules` (a submodule import),
    else `pkg` (a name its `__init__` defines, so running that `__init__` is the dependency).
    """
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return found


def import_graph(*roots: Path) -> dict[str, set[str]]:
    """module -> the modules of `roots` it imports (a package's import names its `__init__`); perl_core by default."""
    files = {_module_name(p, root): p for root in roots or (ROOT,) for p in root.rglob("*.py")}
    return {name: {t for t in _imports(path, name, set(files)) if t in files and t != name}
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as a path that returns to its start, or None (depth-first, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_circle_and_passes_a_tree(tmp_path):
    pkg = tmp_path / "perl_core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from perl_core.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f():\n    from perl_core.c import g\n")
    (pkg / "c.py").write_text("X = 1\n")
    graph = import_graph(pkg)
    assert graph["perl_core.a"] == {"perl_core.sub.b"}
    assert graph["perl_core.sub.b"] == {"perl_core.c"}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def g():\n    from .a import x\n")  # lazy and relative: still a circle
    assert find_cycle(import_graph(pkg)) == ["perl_core.a", "perl_core.sub.b", "perl_core.c", "perl_core.a"]
    (pkg / "c.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("from perl_core.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from perl_core.sub import f as again\n")  # a name of the __init__
    assert set(find_cycle(import_graph(pkg)) or ()) == {"perl_core.sub", "perl_core.sub.b"}


def room(module: str) -> str:
    """The room a module stands in: perl_core's top-level files and sub-packages one each; bench and flows whole."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "perl_core" else parts[0]


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets)
    return {name: targets - {name} for name, targets in rooms.items()}


def test_room_graph_sees_an_arrow_running_back_up(tmp_path):
    """No circle between files, yet one between rooms: sub/a.py -> b.py -> sub/c.py (the folder sub above b and below it)."""
    pkg = tmp_path / "perl_core"
    (pkg / "sub").mkdir(parents=True)
    for name, text in {"__init__.py": "", "sub/__init__.py": "", "sub/a.py": "from perl_core import b\n",
                       "b.py": "from perl_core.sub import c\n", "sub/c.py": "X = 1\n"}.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert find_cycle(graph) is None
    assert find_cycle(room_graph(graph)) in (["perl_core.b", "perl_core.sub", "perl_core.b"],
                                             ["perl_core.sub", "perl_core.b", "perl_core.sub"])
    (pkg / "sub" / "c.py").unlink()
    (pkg / "b.py").write_text("X = 1\n")
    assert find_cycle(room_graph(import_graph(pkg))) is None


def test_no_circle_between_rooms_so_no_arrow_runs_back_up():
    rooms = room_graph(import_graph(*(ROOT.parent / top for top in TOPS)))
    assert {"perl_core.policy", "perl_core.eval", "perl_core.metrics", "bench", "flows"} <= set(rooms)
    assert find_cycle(rooms) is None, " -> ".join(find_cycle(rooms))


@pytest.mark.parametrize("lower, higher", [("perl_core", "bench"), ("perl_core", "flows"), ("bench", "flows")])
def test_the_library_never_imports_its_shells(lower, higher):
    rooms = room_graph(import_graph(*(ROOT.parent / top for top in TOPS)))
    offenders = sorted(name for name, targets in rooms.items() if name.split(".")[0] == lower and higher in targets)
    assert offenders == []


def test_perl_core_has_no_import_circle():
    graph = import_graph()
    assert {"perl_core.policy.rl", "perl_core.policy.roles", "perl_core.eval.reward"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("forbidden", ["prefect", "mlflow"])
def test_perl_core_never_imports_the_orchestration(forbidden):
    offenders = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
                 if any(t == forbidden or t.startswith(forbidden + ".")
                        for t in _imports(p, _module_name(p)))]
    assert offenders == []
