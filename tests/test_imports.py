"""The package's import graph keeps the declared layer order and has no cycle.

Every `import gan_tune...` counts, at module level, inside a function, or under `if TYPE_CHECKING:` (a type-only
import is still a dependency a reader has to follow). Sub-packages are ordered by how data flows through
them (gan_tune/__init__.py); the modules at the top level and any `__main__` are commands, above them all.
"""

import ast
from pathlib import Path

import gan_tune

PACKAGE = Path(gan_tune.__file__).parent
LAYERS = ("training", "quality", "tracking", "tuning", "benchmarks", "commands")
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    return ".".join(("gan_tune", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 or parts[-1] == "__main__":
        return "commands"
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """gan_tune modules that `path` imports anywhere (`from gan_tune.x import name` counts as x.name when that
    is a module, else as x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gan_tune"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gan_tune")}
    return found & set(MODULES)


def import_graph() -> dict[str, set[str]]:
    return {name: imports_of(path) - {name, "gan_tune"} for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path back to it."""
    found = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a layer into a later one (a package __init__ may reach into its own modules)."""
    return sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts
                  if LAYERS.index(layer(dst)) > LAYERS.index(layer(src)))


def test_the_graph_sees_function_level_and_type_only_imports():
    graph = import_graph()
    assert "gan_tune.training.step" in graph["gan_tune.tuning.trainable"]
    assert "gan_tune.tuning.trainable" in graph["gan_tune.benchmarks.throughput"]  # imported inside a function
    assert "gan_tune.training.step" in graph["gan_tune.training.checkpoint"]  # under TYPE_CHECKING


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_import_goes_against_the_layer_order():
    assert upward(import_graph()) == []


def test_the_checks_find_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"], ["b", "a", "b"]]
    assert upward({"gan_tune.training.step": {"gan_tune.quality.scorer"}}) == \
        ["gan_tune.training.step -> gan_tune.quality.scorer"]


def test_every_module_sits_in_a_declared_layer_and_stays_short():
    assert {layer(name) for name in MODULES if name != "gan_tune"} <= set(LAYERS)
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_reading_spaces_and_drawing_reports_import_no_trainable():
    graph = import_graph()

    def reach(module):
        seen, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert "gan_tune.tuning.trainable" not in reach("gan_tune.tuning.spaces")
    assert "gan_tune.tuning.trainable" not in reach("gan_tune.report")


def test_no_function_runs_past_sixty_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}" for name, path in MODULES.items()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []
