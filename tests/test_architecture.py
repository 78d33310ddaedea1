"""The import graph of the package goes one way: foundations -> layers -> flow ->
models / data -> evaluation -> runs -> training -> vi -> CLI. No module imports a floor above
its own (so there are no cycles between floors)."""

import ast
from pathlib import Path

import resflow

PACKAGE = Path(resflow.__file__).resolve().parent

FLOORS = {
    "config": 0, "value_checks": 0, "registry": 0, "io": 0, "allocator": 0, "version": 0,
    "train_config": 0.5, "checkpoint": 0.5,
    "layers": 1, "distributions": 1,
    "preprocess": 2, "nets": 2,
    "flow": 3, "flow_distribution": 3.5,
    "models": 4, "data": 4, "constructors": 4.5,
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


# ---- modules: no cycles, and each sub-package in floors of its own ------------------------
def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _module_imports(path: Path) -> set[str]:
    """The resflow modules ``path`` imports (anywhere in it, functions included): for
    ``from a.b import c``, the module ``a.b.c`` when it is one, else ``a.b``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resflow"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("resflow")}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules():
    """Within and across sub-packages, no module imports one that imports it back
    (directly or through others, lazy imports inside functions included). A package's
    ``__init__`` may gather its own modules; they must not import it back."""
    graph = {m: _module_imports(p) & set(MODULES) for m, p in MODULES.items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


MAX_LINES = 520


def test_no_source_file_is_long():
    """One concept per module: no file of the package over about 500 lines."""
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, long


# ---- sub-packages: each in floors of its own ---------------------------------------------
SUBFLOORS: dict[str, dict[str, float]] = {
    "resflow.layers": {
        "hooks": 0, "transformers": 0,
        "base": 1, "logistic_mixture": 1, "sigmoidal": 1, "splines": 1,
        "*": 2,  # the generic layers
        "halves": 3, "tarflow": 3,
        "residual": 4,
    },
    "resflow.layers.residual": {
        "norms": 0, "conv_ops": 0, "spectral_bounds": 0, "in_forward": 0, "kernels": 0,
        "mixed_norms": 1, "refresh": 1, "activations": 1,
        "spectral": 2, "lipschitz_layers": 3, "jacobian": 4, "logdet": 5, "fused": 6,
        "block": 7, "model_estimators": 8,
    },
    "resflow.models": {
        "limits": 0, "multiscale": 0, "dequantization": 1, "configs": 2, "registry": 3,
        "*": 4,  # the families: a new one is one new file
        "hybrid": 5, "iresnet": 5,  # built on the residual flow's builder
    },
    "resflow.data": {
        "config": 0, "download": 0, "tabular": 0, "toy2d": 0,
        "split": 1, "tabular_benchmarks": 1, "registry": 2, "formats": 3, "images": 4,
    },
    "resflow.training": {
        "ema": 0, "objectives": 0, "optim": 0, "process_group": 0,
        "distributed": 1, "reporting": 2, "state": 2, "trainer": 3,
    },
    "resflow.runs": {"folder": 0, "outputs": 0, "resume": 1},
    "resflow.cli": {"checks": 0, "common": 0, "*": 1, "parser": 2, "__main__": 3},
}  # fmt: skip


def _sub_floor(package: str, name: str) -> float:
    floors = SUBFLOORS[package]
    if name in floors:
        return floors[name]
    assert "*" in floors, f"{package}.{name} has no floor in SUBFLOORS"
    return floors["*"]


def test_no_upward_imports_within_sub_packages():
    """Inside each sub-package, a module imports only modules of lower floors (its
    ``__init__`` gathers them and is not counted)."""
    upward = []
    for module, path in sorted(MODULES.items()):
        package, _, name = module.rpartition(".")
        if package not in SUBFLOORS or path.name == "__init__.py" and module in SUBFLOORS:
            continue
        if path.name == "__init__.py":  # a nested package is one component of its parent
            package, _, name = module.rpartition(".")
        mine = _sub_floor(package, name)
        depth = len(package.split("."))
        for target in _module_imports(path):
            if not target.startswith(package + ".") or target == module:
                continue
            sibling = target.split(".")[depth]
            if sibling != name and _sub_floor(package, sibling) >= mine:
                upward.append(f"{module} -> {package}.{sibling}")
    assert not upward, upward
