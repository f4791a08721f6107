"""The worker's modules import each other without a loop, and only ``worker/rq_compat.py`` reaches into RQ."""

from __future__ import annotations

import ast
from pathlib import Path

WORKER = Path(__file__).resolve().parents[2] / "worker"
RQ_INTERNAL_MODULES = ("rq.executions", "rq.results")


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(WORKER.glob("*.py"))}


def worker_imports(tree: ast.Module, names: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                found |= {module.split(".")[0]} if module else {alias.name for alias in node.names}
            elif module.startswith("steelsight.worker"):
                rest = module.removeprefix("steelsight.worker").lstrip(".")
                found |= {rest.split(".")[0]} if rest else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("steelsight.worker.")}
    return found & names


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        if state.get(name) == 1:
            return [*path, name]
        if state.get(name) == 2:
            return None
        state[name] = 1
        for dep in sorted(graph[name]):
            if found := visit(dep, [*path, name]):
                return found
        state[name] = 2
        return None

    return next((found for name in sorted(graph) if (found := visit(name, []))), None)


def test_the_worker_modules_import_each_other_without_a_loop():
    trees = modules()
    graph = {name: worker_imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    assert cycle(graph) is None, cycle(graph)
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself can fail


def test_only_rq_compat_uses_rq_internals():
    offenders = []
    for name, tree in modules().items():
        if name == "rq_compat":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(RQ_INTERNAL_MODULES):
                offenders.append(f"{name}: imports {node.module}")
            # a private attribute of anything but the module's own objects
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                offenders.append(f"{name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders
