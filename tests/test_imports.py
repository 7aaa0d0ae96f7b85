"""The import structure of fbi/: no circles, and every import runs down the layers that the
docs/code.md "Layers" lists. Imports inside functions count as much as those at the
top of a module: a deferred import hides a circle from Python, not from the next reader."""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom: a module may import modules of its own layer or of a layer below it, never
# above. Patterns are matched against dotted module names; the most specific pattern wins
# (``fbi.binarize`` is the seam, ``fbi.binarize.*`` the schemes behind it).
LAYERS = [
    ("entry", ["fbi.__main__", "fbi.cli"]),
    ("jobs", ["fbi.loop", "fbi.distill.cache_writer", "fbi.estimate", "fbi.report",
              "fbi.eval.harness"]),
    ("assembly", ["fbi.run", "fbi.preflight"]),
    ("features", ["fbi.distill*", "fbi.eval*", "fbi.export*", "fbi.callbacks*", "fbi.trained",
                  "fbi.generate"]),
    ("engine", ["fbi.deepspeed_setup", "fbi.sign_gather", "fbi.sign_buckets", "fbi.checkpoint",
                "fbi.consolidate", "fbi.metrics", "fbi.flops", "fbi.run_lock", "fbi.preemption", "fbi.configure",
                "fbi.lm", "fbi.kernels*"]),
    ("models and data", ["fbi.models*", "fbi.data*"]),
    ("seam", ["fbi.binarize"]),
    ("schemes", ["fbi.binarize.*"]),
    ("ground", ["fbi", "fbi.config", "fbi.atomic", "fbi.fetch", "fbi.distributed", "fbi.progress",
                "fbi.refusal", "fbi.process_exit"]),
]


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted((root / "fbi").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fbi modules ``name`` imports anywhere in its source (``from fbi.x import y``
    counts as importing module ``fbi.x.y`` when that is a module, else ``fbi.x``)."""

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(owner(a.name) for a in node.names if a.name.split(".")[0] == "fbi")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "fbi":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else owner(base))
    found.discard(name)
    found.discard(None)
    return found


def layer_of(name: str) -> int:
    """Index into LAYERS of the most specific pattern matching ``name``."""
    best, best_len = None, -1
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch(name, pattern) and len(pattern) > best_len:
                best, best_len = index, len(pattern)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS here and to docs/code.md")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def graph_of(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}), a higher layer"
        for a, targets in sorted(graph.items()) for b in sorted(targets)
        if layer_of(b) < layer_of(a)
    ]


def test_no_import_circles():
    assert cycles(graph_of(ROOT)) == []


def test_imports_run_down_the_layers():
    assert violations(graph_of(ROOT)) == []


def test_models_import_no_concrete_scheme():
    graph = graph_of(ROOT)
    reached = {b for a, targets in graph.items() if a.startswith("fbi.models") for b in targets}
    assert not [m for m in reached if m.startswith("fbi.binarize.")]


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A deferred upward import and a circle, written into a copy of the package, are found."""
    for path in modules(ROOT).values():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    config = tmp_path / "fbi" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _late():\n    from fbi.loop import train\n")
    graph = graph_of(tmp_path)
    assert any(v.startswith("fbi.config (ground) imports fbi.loop") for v in violations(graph))
    assert any({"fbi.config", "fbi.loop"} <= set(c) for c in cycles(graph))

