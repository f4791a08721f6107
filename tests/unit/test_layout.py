"""The package layout holds: no import loop, serving apart from training, model code apart from the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# folder -> package, as pyproject.toml's package-dir maps them
PACKAGES = {"steelsight": "steelsight", "model": "steelsight.model", "worker": "steelsight.worker",
            "producer": "steelsight.producer", "dashboard": "steelsight.dashboard"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body, lazily or not."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_graph_has_no_loop():
    assert cycles(graph()) == []


def test_serving_imports_nothing_from_training_or_evaluation():
    edges = graph()
    serving = [m for m in edges if m.startswith("steelsight.model.inference")]
    offending = {m: sorted(t for t in edges[m] if t.startswith(("steelsight.model.training",
                                                                "steelsight.model.evaluation")))
                 for m in serving}
    assert not {m: t for m, t in offending.items() if t}


def test_model_code_knows_no_queue_store_or_service():
    pipeline = ("steelsight.worker", "steelsight.producer", "steelsight.dashboard", "steelsight.clients",
                "steelsight.stack", "steelsight.devstack")
    found = modules()
    bad = {}
    for name, path in found.items():
        if not (name == "steelsight.model" or name.startswith("steelsight.model.")):  # not steelsight.model_command
            continue
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        hits = sorted(n for n in names if n.split(".")[0] in ("redis", "rq", "minio") or n.startswith(pipeline))
        if hits:
            bad[name] = hits
    assert not bad
