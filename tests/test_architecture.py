"""The package's shape: no import cycle, and imports that only point down the layers of
docs/architecture.md. Read from the source (every ``import`` statement, module-level or inside a
function), so a cycle dodged by a function-local import is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metarobust"

LAYERS = [
    ("errors", "registry", "precision", "resources", "compilation"),
    ("config",),
    ("data", "models", "attacks", "runs", "distributed", "plots", "segmentation"),
    ("blackbox",),  # the oracle and the query attacks (over attacks; its ``run`` is a command, below)
    ("meta",),
    ("training.objectives", "training.optim", "training.awp"),
    ("training.recipes",),
    ("training.data", "training.engine"),
    ("evaluation", "analysis"),
    ("experiment", "analysis.run_analysis", "seg_experiment", "blackbox.run", "blackbox.mcg.fit",
     "blackbox.mcg.fewshot"),
    ("cli", "__main__"),
]
"""Bottom to top: a module may import its own layer and the layers below it. ``analysis.run_analysis`` is
the ``metarobust id`` command (it loads a run as ``metarobust eval`` does), hence its layer; likewise
``blackbox.run`` (``metarobust blackbox``) and ``blackbox.mcg.fit`` (``metarobust blackbox-train``), and
``blackbox.mcg.fewshot``, which loads their few-shot surrogate runs and adapts them as evaluation does."""


def modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports (the longest known prefix of each name)."""

    def resolve(dotted: str) -> str | None:
        parts = dotted.split(".")
        if parts[0] != "metarobust":
            return None
        for end in range(len(parts), 1, -1):
            candidate = ".".join(parts[1:end])
            if candidate in known:
                return candidate
        return None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names}
    return {m for m in found if m is not None}


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imports(path, known) - {name} for name, path in known.items()}


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (``training.recipes.mat`` -> ``training.recipes``)."""
    best, rank = -1, None
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"metarobust.{module} belongs to no layer of LAYERS; add it"
    return rank


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` (depth-first search), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in edges.items():
        for target in targets:
            if module and target and layer_of(target) > layer_of(module):
                out.append(f"metarobust.{module} (layer {layer_of(module)}) imports metarobust.{target} "
                           f"(layer {layer_of(target)})")
    return sorted(out)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(f"metarobust.{m}" for m in cycle)


def test_imports_only_point_down_the_layers():
    upward = upward_imports(graph())
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """The two tests above can fail: a made-up package with a function-local cyclic import."""
    package = tmp_path / "metarobust"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("from metarobust.data.store import ImageStore\n")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "store.py").write_text("def f():\n    from metarobust.config import X\n")
    edges = graph(package)
    assert find_cycle(edges) == ["config", "data.store", "config"]
    assert upward_imports(edges) == ["metarobust.config (layer 1) imports metarobust.data.store (layer 2)"]
