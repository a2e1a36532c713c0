"""The package's layout keeps its rules: no import cycle between rooms (counting imports inside
functions), the search and the final run siblings, and an import inside a function only where it
keeps a heavy dependency lazy, saying so on its line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lrsearch"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


MODULES = _modules()


def _room(module: str) -> str:
    """``lrsearch.optim.recipe`` -> ``lrsearch.optim``; a top-level module is its own room."""
    return ".".join(module.split(".")[:2])


def _imports(tree: ast.Module) -> list[tuple[str, ast.stmt, bool]]:
    """Each import of lrsearch's own modules: (the module it names, the statement, inside a
    function); imports under ``if TYPE_CHECKING:`` never run and are left out."""
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name.startswith("lrsearch."):
                found.append((name, node, id(node) not in top))
    return found


def _room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, tree in MODULES.items():
        for target, _, _ in _imports(tree):
            if _room(target) != _room(module):
                graph.setdefault(_room(module), set()).add(_room(target))
    return graph


def test_no_two_rooms_import_each_other_even_inside_functions():
    graph = _room_graph()
    cycles = []

    def reach(start: str, here: str, path: list[str], seen: set[str]) -> None:
        for nxt in graph.get(here, ()):
            if nxt == start:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                reach(start, nxt, [*path, nxt], seen)

    for room in graph:
        reach(room, room, [room], {room})
    assert not cycles, cycles


@pytest.mark.parametrize(("lower", "upper"), [
    ("lrsearch.final", "lrsearch.tuning"),  # siblings over the engine
    ("lrsearch.tuning", "lrsearch.final"),
    ("lrsearch.optim", "lrsearch.job"),  # the math sits below the job schema
    ("lrsearch.job", "lrsearch.tasks"),
    ("lrsearch.engine", "lrsearch.tuning"),
])
def test_a_lower_room_never_imports_a_higher_one(lower, upper):
    assert upper not in _room_graph().get(lower, set())


def test_an_import_inside_a_function_says_which_heavy_dependency_it_keeps_lazy():
    lines = {module: (PACKAGE.parent / (module.replace(".", "/") + ".py")) for module in MODULES}
    bare = []
    for module, tree in MODULES.items():
        path = lines[module] if lines[module].is_file() else PACKAGE.parent / module.replace(".", "/") / "__init__.py"
        text = path.read_text(encoding="utf-8").splitlines()
        for _, node, inside in _imports(tree):
            if inside and "#" not in text[node.lineno - 1] and "#" not in text[node.end_lineno - 1]:
                bare.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bare, bare


def test_only_the_drivers_below_the_entry_points_take_the_job():
    entry = ("lrsearch.api", "lrsearch.cli", "lrsearch.integrations", "lrsearch.job", "lrsearch.infra.jobs",
             "lrsearch.demo")
    takers = set()
    for module, tree in MODULES.items():
        if module.startswith(entry):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for arg in node.args.args + node.args.kwonlyargs:
                    annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                    if arg.arg == "job" or "JobConfig" in annotation:
                        takers.add(f"{module}.{node.name}")
    assert takers == {"lrsearch.tuning.runner.run_search", "lrsearch.final.driver.run_final",
                      "lrsearch.range_test.finder.find_lr", "lrsearch.tasks.build_task"}
