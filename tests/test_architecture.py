"""The import graph of the package goes one way: foundations -> layers -> flow ->
models / data -> evaluation -> runs -> training -> vi -> CLI. No module imports a floor above
its own (so there are no cycles between floors)."""

import ast
from pathlib import Path

import resflow

PACKAGE = Path(resflow.__file__).resolve().parent

FLOORS = {
    "config": 0, "registry": 0, "io": 0, "allocator": 0,
    "train_config": 0.5, "checkpoint": 0.5,
    "layers": 1, "distributions": 1,
    "preprocess": 2, "nets": 2,
    "flow": 3,
    "models": 4, "data": 4,
    "evaluation": 5, "plots": 5, "certify": 5, "latent": 5, "fid": 5, "scoring": 5.5,
    "runs": 6,
    "training": 7,
    "vi": 7.5,
    "cli": 8,
    "__init__": 9,
}  # fmt: skip


def _component(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resflow."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("resflow.")}
    return out


def test_every_component_has_a_floor():
    components = {_component(p) for p in PACKAGE.rglob("*.py")}
    assert components <= set(FLOORS), components - set(FLOORS)


def test_no_upward_imports():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _component(path)
        for target in _imports(path) - {me}:
            if FLOORS[target] >= FLOORS[me]:
                upward.append(f"{path.relative_to(PACKAGE)} -> {target}")
    assert not upward, upward


def test_layers_do_not_import_models_or_training():
    for path in (PACKAGE / "layers").rglob("*.py"):
        assert not _imports(path) & {"models", "training", "cli", "runs", "data"}, path
