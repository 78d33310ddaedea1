"""The README's building-block example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    lines = first.group(1).strip().splitlines()
    assert lines[0].endswith("resflow train") and "pip install torch==2.13.0" in lines[0]
    assert lines[1] == ".venv/bin/python -m pytest"
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[1] in ci


def test_building_block_example_runs():
    blocks = _python_blocks()
    example = next(b for b in blocks if "ResidualBlock(" in b)
    namespace: dict = {}
    exec(compile("import torch\n" + example, "README", "exec"), namespace)
    flow = namespace["flow"]
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad and p.dim() == 2)


def test_families_example_runs():
    example = next(b for b in _python_blocks() if "manifold_interpolation(" in b)
    namespace: dict = {}
    exec(compile("import torch\n" + example, "README", "exec"), namespace)
    from resflow.models import count_parameters

    assert f"{count_parameters(namespace['glow']) / 1e6:.1f}M" in example
    assert namespace["grid"].shape == (64, 1, 8, 8)


def test_variational_inference_example_runs():
    example = next(b for b in _python_blocks() if "fit_reverse_kl(" in b)
    assert "steps=1000" in example
    short = example.replace("steps=1000", "steps=5").replace("anneal=500", "anneal=3")
    namespace: dict = {}
    exec(compile(short, "README", "exec"), namespace)
    assert namespace["vae"].cfg.posterior == "iaf-dsf"
    assert not namespace["iaf"].training  # fitted, left in evaluation mode


def test_conditional_flow_example_runs():
    example = next(b for b in _python_blocks() if "as_distribution(" in b)
    namespace: dict = {}
    exec(compile("import torch\n" + example, "README", "exec"), namespace)
    assert namespace["draws"].shape == (100, 5, 2)
    assert namespace["d"].batch_shape == (5,)
    namespace["loss"].backward()
