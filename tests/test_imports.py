"""The package's own import graph (every `import gan_tune...`, at module level or inside a function) has no cycle."""

import ast
from pathlib import Path

import gan_tune

PACKAGE = Path(gan_tune.__file__).parent


def imports_of(path: Path) -> set[str]:
    """gan_tune modules that `path` imports anywhere, type-checking-only imports left out (they never run)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gan_tune"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name for name in names if (PACKAGE / f"{name.split('.')[1]}.py").exists()
                      and name.count(".") == 1} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gan_tune.")}
    return {name.split(".")[1] for name in found if "." in name}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) - {path.stem} for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with one path back to it."""
    found = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    found.append(path + [start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "train" in graph["trainable"] and "metrics" in graph["train"]
    assert "trainable" in graph["bench"]  # imported inside a function


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"], ["b", "a", "b"]]


def test_reading_spaces_and_drawing_reports_import_no_trainable():
    graph = import_graph()

    def reach(module):
        seen, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert "trainable" not in reach("spaces") and "trainable" not in reach("report")
