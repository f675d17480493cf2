"""The package's import graph keeps the declared layer order and has no cycle.

Every `import gan_tune...` counts, at module level, inside a function, or under `if TYPE_CHECKING:` (a type-only
import is still a dependency a reader has to follow); a relative import (`from .step import Gan`) is refused, so
every import is one the graph sees. Sub-packages are in import order (gan_tune/__init__.py), a sub-package's
`__init__` in its own layer; the modules at the top level and any `__main__` are commands, above them all.
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
# an installed package (CI tests the wheel's install) also holds gan_tune.search_spaces: the YAML spaces, no code
DATA_PACKAGES = {"search_spaces"}
SUBPACKAGES = {path.parent.name for path in PACKAGE.glob("*/__init__.py")} - DATA_PACKAGES


def layer(module: str) -> str:
    """A sub-package's module, or its `__init__` (gan_tune.training), sits in that sub-package's layer; a
    top-level module (gan_tune.train) or a `__main__` is a command."""
    parts = module.split(".")
    if parts[-1] == "__main__" or (len(parts) == 2 and parts[1] not in SUBPACKAGES):
        return "commands"
    return parts[1]


def relative_imports(source: str) -> list[str]:
    """`from . import x` / `from .x import y` lines: imports_of reads absolute names only."""
    return [f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import "
            f"{', '.join(alias.name for alias in node.names)}"
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.level > 0]


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


def test_an_upward_import_in_a_sub_packages_init_is_caught():
    assert layer("gan_tune.training") == "training" and layer("gan_tune.train") == "commands"
    assert upward({"gan_tune.training": {"gan_tune.quality.scorer"}}) == \
        ["gan_tune.training -> gan_tune.quality.scorer"]
    assert upward({"gan_tune.tracking": {"gan_tune.tracking.child_runs"}}) == []  # an __init__ into its own modules


def test_no_module_imports_relatively():
    assert {name: found for name, path in MODULES.items() if (found := relative_imports(path.read_text()))} == {}


def test_the_relative_import_check_finds_both_forms():
    source = "import gan_tune.training\nfrom gan_tune.training import step\n" \
             "from .step import Gan\nfrom .. import quality\n"
    assert relative_imports(source) == ["line 3: from .step import Gan", "line 4: from .. import quality"]


def test_every_module_sits_in_a_declared_layer_and_stays_short():
    assert SUBPACKAGES == set(LAYERS) - {"commands"}
    assert {layer(name) for name in MODULES if name != "gan_tune"} <= set(LAYERS)
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_each_sub_packages_docstring_names_every_module_it_holds():
    def unnamed(package):
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
        return sorted(path.stem for path in (PACKAGE / package).glob("*.py")
                      if path.stem != "__init__" and f"`{path.stem}`" not in doc)

    assert {package: names for package in SUBPACKAGES if (names := unnamed(package))} == {}


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
