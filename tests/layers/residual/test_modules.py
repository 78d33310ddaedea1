"""The shape of ``resflow.layers.residual``: small modules, each with a docstring saying
its job, and an import graph among them without cycles (imports inside functions
included: a lazy import does not break a cycle)."""

import ast
from pathlib import Path

import resflow.layers.residual as residual

PACKAGE = Path(residual.__file__).resolve().parent
PREFIX = "resflow.layers.residual"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _imports(path: Path, names: set[str]) -> set[str]:
    """The sibling modules that ``path`` imports, anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PREFIX:
                out |= {a.name for a in node.names if a.name in names}
            elif node.module.startswith(PREFIX + "."):
                out.add(node.module.split(".")[3])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[3] for a in node.names if a.name.startswith(PREFIX + ".")}
    return out


def test_every_module_is_small_and_says_its_job():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{name}.py has no module docstring"
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name}.py is too long"


def test_the_modules_import_each_other_without_cycles():
    mods = _modules()
    graph = {name: _imports(path, set(mods)) - {name} for name, path in mods.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack, name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*stack, name])
        done.add(name)

    for name in graph:
        visit(name, [])
