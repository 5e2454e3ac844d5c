"""The import graph of the amid package: no cycle anywhere, and amid.ami imports nothing
outside amid.ami (the AMI library stands alone; see docs/DESIGN.md).

Every module is parsed, not imported, and every import statement that can run counts, those
inside functions included (a function-level import is a dependency all the same, only a later
one). Imports under ``if TYPE_CHECKING:`` never run and are left out: they are how two modules
name each other's types without a circle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "amid"


def module_names(package: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``); a C
    extension (``_speedups.c``, built beside its source) is a module that imports nothing."""
    modules = {}
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.c")]):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports. ``from a import b`` imports the module
    ``a.b`` when there is one, else ``a`` (``b`` is a name in it)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node.body = []  # ast.walk has not entered it yet: its imports are skipped
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # "import amid.ami.protocol" depends on that module (its packages run first, as
            # they do for every import, and are not counted as dependencies).
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    known = module_names(PACKAGE)
    return {name: imported(name, path, known) if path.suffix == ".py" else set()
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_every_module() -> None:
    graph = import_graph()
    assert {"amid", "amid.ami", "amid.ami.protocol", "amid.ami._accel", "amid.records"} <= graph.keys()
    assert "amid.ami._accel" in graph["amid.ami.protocol"]  # a module-level import
    assert "amid.ami.protocol" in graph["amid._encode"]
    assert "amid.ami._speedups" in graph["amid.ami._accel"]  # the C extension, a leaf


def test_function_level_imports_count_and_type_checking_ones_do_not(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from . import a\nelse:\n    import pkg.c\n")
    (package / "c.py").write_text("from .a import f\n")
    known = module_names(package)
    assert {name: imported(name, path, known) for name, path in known.items()} == {
        "pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}


def test_cycles_are_found() -> None:
    """The detector itself: a circle of three, one of two, and a tree without any."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "a"}, "f": {"a", "e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(import_graph()) == []


def test_the_accelerator_imports_nothing_of_amid() -> None:
    """Modules ask amid.ami._accel for the C functions; it never asks them back."""
    assert import_graph()["amid.ami._accel"] == {"amid.ami._speedups"}


@pytest.mark.parametrize("module", sorted(name for name in import_graph()
                                          if name == "amid.ami" or name.startswith("amid.ami.")))
def test_amid_ami_imports_nothing_outside_amid_ami(module: str) -> None:
    outside = {target for target in import_graph()[module]
               if target != "amid.ami" and not target.startswith("amid.ami.")}
    assert outside == set()
