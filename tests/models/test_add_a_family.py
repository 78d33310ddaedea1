"""The recipe "How to add a family" of docs/ARCHITECTURE.md, followed step by step.

The family is written here rather than in ``src/resflow/models/`` (where a real one
goes, and where it is registered on import); everything else is what the recipe says:
a config on the shared base, a builder composed from contract-tested layers, one
``register_model`` and a small preset, after which the library, the command line and
the contract checks take it like any family.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from resflow.cli import main
from resflow.config import param
from resflow.flow import Flow
from resflow.layers.actnorm import ElementActNorm
from resflow.layers.base import FlowLayer, Sequential
from resflow.layers.coupling import ChannelMask, Coupling
from resflow.layers.transformers import Affine
from resflow.models import MODELS, PRESETS, build_model, get_preset, register_model
from resflow.models.configs import MAX_WIDTH, VectorModelConfig
from resflow.models.registry import Preset
from resflow.nets.conditioners import MLP
from resflow.runs import RunFolder
from resflow.train_config import TrainConfig

from helpers import brute_logdet


# Step 1: the config derives from the base of its kind and declares only its own fields.
@dataclass
class TinyCouplingConfig(VectorModelConfig):
    """Affine couplings with alternating halves and an ActNorm after each."""

    dim: int = param(2, ge=2, le=1_000_000, help="data dimension")
    n_couplings: int = param(4, ge=1, le=64, help="couplings")
    hidden: tuple[int, ...] = param((32,), ge=1, le=MAX_WIDTH, help="MLP widths")


# Step 2: the builder composes contract-tested layers into a Flow.
def build_tiny_coupling(cfg: TinyCouplingConfig) -> Flow:
    layers: list[FlowLayer] = []
    for j in range(cfg.n_couplings):
        net = partial(MLP, hidden=cfg.hidden)
        layers.append(Coupling.build((cfg.dim,), ChannelMask(j % 2 == 1), Affine("exp"), net))
        layers.append(ElementActNorm((cfg.dim,)))
    return Flow(Sequential(layers), (cfg.dim,))


@pytest.fixture
def family() -> Iterator[str]:
    """Step 3: one ``register_model`` and a small preset (a real family calls
    ``register_model`` / ``register_preset`` at import; here they are undone after)."""
    with ExitStack() as stack:
        entry = register_model("tiny-coupling", config=TinyCouplingConfig,
                               build=build_tiny_coupling, kind="vector")  # fmt: skip
        stack.callback(MODELS.unregister, "tiny-coupling")
        preset = Preset("tiny-coupling-toy2d", entry.name, TinyCouplingConfig(),
                        TrainConfig(lr=1e-2, warmup=0, batch_size=64),
                        "2-D densities in seconds")  # fmt: skip
        stack.enter_context(PRESETS.registered(preset.name, preset))
        yield preset.name


def test_the_library_and_the_command_line_take_the_new_family(family, tmp_path, capsys):
    assert family in PRESETS and get_preset(family) == TinyCouplingConfig()
    run = tmp_path / "run"
    code = main(["train", "--preset", family, "--data", "8gaussians", "--n-train", "256",
                 "--n-test", "128", "--steps", "20", "--eval-every", "20", "--out", str(run),
                 "--no-progress", "--no-tensorboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "nats" in out, out
    model = RunFolder(run).load_model()
    assert isinstance(model, Flow) and model.shape == (2,)
    assert main(["sample", "--run", str(run), "--n", "8", "--out", str(tmp_path / "s.npy")]) == 0
    assert main(["check", "--run", str(run), "--n", "16"]) == 0  # its certificate passes
    with pytest.raises(TypeError, match="must derive from ImageModelConfig"):
        register_model("tiny-coupling-image", config=TinyCouplingConfig,
                       build=build_tiny_coupling, kind="image")  # fmt: skip


def test_the_new_family_keeps_the_layer_contract(family):
    """Step 4, the contract test's checks (its ``MODELS_TINY`` lists a real family):
    the logdet against a brute-force Jacobian, the round trip, state reload."""
    torch.manual_seed(0)
    model = build_model(TinyCouplingConfig(dim=3, n_couplings=3, hidden=(8,))).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    model(x)  # data-dependent ActNorm initialisation
    with torch.no_grad():
        for p in model.parameters():  # away from the identity at initialisation
            p.add_(0.3 * torch.randn_like(p))
    z, logdet = model.layers(x)
    torch.testing.assert_close(logdet, brute_logdet(lambda v: model.layers(v)[0], x))
    torch.testing.assert_close(model.inverse(z.detach()), x)
    fresh = build_model(TinyCouplingConfig(dim=3, n_couplings=3, hidden=(8,))).double()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x))
