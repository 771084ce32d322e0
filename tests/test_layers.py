"""The package layers of docs/architecture.md, checked from the source:
which package may import which, and no import cycle among our modules
(imports inside functions included: a cycle there is one too)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("data_pipeline", "mm_models", "train", "launch", "serve")
# What each package may import of ours (docs/architecture.md, "Layers").
ALLOWED = {
    "data_pipeline": {"data_pipeline"},
    "mm_models": {"mm_models"},
    "train": {"train", "mm_models", "data_pipeline"},
    "launch": {"launch", "train"},
    "serve": {"serve", "mm_models", "data_pipeline"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules `path` imports (a package's __init__ for `from pkg import name`
    unless `name` is a module of it)."""
    out = set()
    me = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        out.update(n for n in names if n in modules and n != me)
    return out


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def test_each_package_imports_only_the_layers_below_it():
    wrong = [(m, d) for m, deps in graph().items() for d in deps if d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not wrong, wrong


def test_there_is_no_import_cycle():
    g = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    edges = {m: {d for d in deps if not (m == d.split(".")[0] and "." not in m)} for m, deps in g.items()}
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d) :] + [d])
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


# Inside train/: a task is asked by the run, never the other way round, and
# the engine knows nothing of tasks.
ROOM_RULES = [("train.tasks", "train.run"), ("train.engine", "train.tasks"), ("train.tasks", "train.builders")]


def test_the_rooms_inside_train_import_only_downwards():
    wrong = [
        (m, d)
        for m, deps in graph().items()
        for d in deps
        for room, banned in ROOM_RULES
        if (m == room or m.startswith(room + ".")) and (d == banned or d.startswith(banned + "."))
    ]
    assert not wrong, wrong


def test_nothing_in_train_asks_which_task_runs():
    """The task is chosen once (train.tasks.task_for / saved_task); its name is
    compared nowhere else."""
    import re

    asks = re.compile(
        r"""(task\.name|\["name"\]|get\("name"[^)]*\))\s*[!=]=|TaskName\.\w+\s*[!=]=|[!=]=\s*TaskName\."""
    )
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for p in (REPO / "train").rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if asks.search(line) or re.search(r"""[!=]=\s*["'](classify|pretrain)["']""", line)
    ]
    assert not found, found
