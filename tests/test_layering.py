"""The import graph of `hyperowl/`: arrows point down the layers only, and no module circle exists.

Layers, bottom to top: foundation (`config`, `errors`, `hub`) < `model` < `processing` < `engine` <
data (`synthetic`) < tasks (`train`, `eval`, `baselines`, `rag`, `integrations`) < `serve`
< command line (`cli`, every `*.cli` module, `chat_cli`, `synthetic.__main__`). A module may import its
own layer and the layers below. The package facade `hyperowl/__init__.py` re-exports the public API and
is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hyperowl"

LAYERS = [
    ("foundation", ("hyperowl.config", "hyperowl.errors", "hyperowl.hub")),
    ("model", ("hyperowl.model",)),
    ("processing", ("hyperowl.processing",)),
    ("engine", ("hyperowl.engine",)),
    ("data", ("hyperowl.synthetic",)),
    ("tasks", ("hyperowl.train", "hyperowl.eval", "hyperowl.baselines", "hyperowl.rag", "hyperowl.integrations")),
    ("serve", ("hyperowl.serve",)),
    ("cli", ("hyperowl.cli", "hyperowl.chat_cli")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> int:
    if module.endswith((".cli", ".__main__")):
        return len(LAYERS) - 1
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(inside(module, p) for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def imports(path: Path) -> tuple[set[str], set[str]]:
    """The hyperowl modules `path` imports: (all of them, those imported outside `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            type_only.update(id(n) for n in ast.walk(node))
    every, runtime = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.startswith("hyperowl.") and name != "hyperowl":
                every.add(name)
                if id(node) not in type_only:
                    runtime.add(name)
    return every, runtime


def graph() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT}


def test_imports_point_down_the_layers():
    wrong = []
    for module, (every, _) in sorted(graph().items()):
        for target in sorted(every):
            if layer(target) > layer(module):
                wrong.append(f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_no_import_circles():
    modules = graph()
    edges = {m: {t for t in runtime if t in modules} for m, (_, runtime) in modules.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import circle: " + " -> ".join(cycle))


def test_only_command_line_modules_join_the_synthetic_data_and_the_evaluation():
    """`hyperowl.synthetic` and `hyperowl.eval` import each other only in their command-line modules."""
    joined = [
        f"{m} imports {t}"
        for m, (every, _) in graph().items()
        if layer(m) < len(LAYERS) - 1
        for t in every
        for mine, other in (("hyperowl.synthetic", "hyperowl.eval"), ("hyperowl.eval", "hyperowl.synthetic"))
        if inside(m, mine) and inside(t, other)
    ]
    assert not joined, "\n".join(joined)


def test_the_model_imports_nothing_above_it():
    above = [
        (m, t)
        for m, (every, _) in graph().items()
        if m.startswith("hyperowl.model")
        for t in every
        if not t.startswith(("hyperowl.model", "hyperowl.config", "hyperowl.errors", "hyperowl.hub"))
    ]
    assert not above
