"""Vector flows conditioned on a continuous context ``c``: ``log p(x | c)`` keeps the
layer contract with the context (brute-force Jacobian, round trip, gradients), depends
on ``c``, refuses a missing or malformed context, and a conditional flow fitted to a
conditional Gaussian recovers its density; and every flow as a torch distribution."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from resflow.flow_distribution import as_distribution
from resflow.layers import ResidualBlock
from resflow.layers.residual.logdet import EstimatorConfig
from resflow.models import build_model
from resflow.models.glow import GlowVectorConfig
from resflow.models.iresnet import IResNetVectorConfig
from resflow.models.naf import MAFConfig, NAFConfig
from resflow.models.nsf import NSFConfig
from resflow.models.realnvp import RealNVPVectorConfig
from resflow.models.residual_flow import VectorFlowConfig

from helpers import brute_logdet

K = 3  # context features
_EXACT = EstimatorConfig(train_method="exact", eval_method="exact")
CONDITIONAL = {
    "maf": lambda: MAFConfig(dim=3, n_flows=2, hidden=(16,), context_features=K),
    "naf": lambda: NAFConfig(
        dim=3, n_flows=2, hidden=(16,), sigmoid_units=4, context_features=K
    ),  # fmt: skip
    "nsf-c": lambda: NSFConfig(
        dim=3, n_flows=2, hidden=16, blocks=1, bins=4, context_features=K
    ),  # fmt: skip
    "nsf-ar": lambda: NSFConfig(
        dim=3,
        transform="autoregressive",
        n_flows=2,
        hidden=16,
        blocks=1,
        bins=4,
        context_features=K,
    ),  # fmt: skip
    "realnvp-vector": lambda: RealNVPVectorConfig(
        dim=3, n_couplings=3, hidden=(16,), context_features=K
    ),  # fmt: skip
    "glow-vector": lambda: GlowVectorConfig(dim=3, depth=2, hidden=(16,), context_features=K),
    "residual-flow-vector": lambda: VectorFlowConfig(
        dim=3, n_blocks=2, hidden=(16,), context_features=K, estimator=_EXACT
    ),  # fmt: skip
    "iresnet-vector": lambda: IResNetVectorConfig(
        dim=3, n_blocks=2, hidden=(16,), context_features=K, estimator=_EXACT
    ),  # fmt: skip
}


def _model(name: str):
    torch.manual_seed(0)
    model = build_model(CONDITIONAL[name]()).double()
    with torch.no_grad():  # away from the identity that zero-initialised outputs start at
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_the_contract_holds_with_a_context(name):
    model = _model(name)
    x = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, K, dtype=torch.float64)
    z, logdet = model(x, c)
    brute = torch.stack([brute_logdet(lambda t, ci=ci: model(t, ci[None]), xi[None])[0]
                         for xi, ci in zip(x, c)])  # fmt: skip
    torch.testing.assert_close(logdet, brute, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.inverse(z, c), x, atol=1e-6, rtol=1e-6)
    # the density depends on the context, and the context gets gradients
    other = model.log_prob(x, c + 1.0)
    assert (model.log_prob(x, c) - other).abs().max() > 1e-3
    c.requires_grad_(True)
    model.log_prob(x, c).sum().backward()
    assert c.grad is not None and c.grad.abs().max() > 0
    # one sample per context row
    s = model.sample(4, context=c.detach())
    assert s.shape == (4, 3) and torch.isfinite(s).all()


@pytest.mark.parametrize("name", ["maf", "nsf-c", "realnvp-vector"])
def test_a_missing_or_malformed_context_is_refused(name):
    model = _model(name)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"this model is conditional: pass a context of shape \[4, 3\]"
    ):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"expected a context of shape \[4, 3\], got \[4, 2\]"):
        model.log_prob(x, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="the context must be a real tensor"):
        model.log_prob(x, torch.ones(4, 3, dtype=torch.long))
    bad = torch.randn(4, 3, dtype=torch.float64)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="context contains 1 non-finite"):
        model.log_prob(x, bad)


# ---- residual flows: the context shifts each branch's first layer, g(x; c) ----------------
def _shifts(model) -> list[torch.Tensor]:
    return [m.g.shift for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.mark.parametrize("name", ["residual-flow-vector", "iresnet-vector"])
def test_a_conditional_residual_flow_is_certified_with_its_unconditional_bound(name):
    """The context's map ``V`` is unconstrained and leaves ``Lip(g)`` in ``x`` alone: the
    certificate of a conditional model (with a large ``V``) passes, and its blocks'
    bounds are those of the unconditional model with the same weights."""
    from resflow.certify import certify

    cfg = CONDITIONAL[name]()
    torch.manual_seed(0)
    cond = build_model(cfg).double()
    torch.manual_seed(0)  # V draws no random numbers: the same branch weights
    plain = build_model(type(cfg)(**{**vars(cfg), "context_features": 0})).double()
    with torch.no_grad():
        for v in _shifts(cond):
            v.copy_(5 * torch.randn_like(v))
    x = torch.randn(32, 3, dtype=torch.float64)
    c = torch.randn(32, K, dtype=torch.float64)
    got, want = certify(cond, x, labels=c), certify(plain, x)
    assert got.passed, "\n".join(got.lines())
    assert [b.name for b in got.blocks] == [b.name for b in want.blocks]
    for b, u in zip(got.blocks, want.blocks):
        assert b.bound == pytest.approx(u.bound, rel=1e-12) and b.bound < 1
        assert b.inverse_error <= 1e-9
    assert got.density_gap is not None and got.density_ok


@pytest.mark.parametrize("name", ["residual-flow-vector", "iresnet-vector"])
def test_a_conditional_residual_flow_trains_its_context_map_and_passes_gradients_to_the_context(
    name,
):
    """With the families' own training estimators (a series, its gradient in the forward
    pass), the loss reaches every block's ``V`` and the context."""
    cfg = CONDITIONAL[name]()
    cfg = type(cfg)(**{**vars(cfg), "estimator": EstimatorConfig()})
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    x = torch.randn(16, 3, dtype=torch.float64)
    c = torch.randn(16, K, dtype=torch.float64, requires_grad=True)
    (-model.log_prob(x, c).mean()).backward()
    assert all(v.grad is not None and v.grad.abs().max() > 0 for v in _shifts(model))
    assert c.grad is not None and c.grad.abs().max() == 0  # V = 0: no dependence yet
    with torch.no_grad():
        for v in _shifts(model):
            v.normal_()
    c.grad = None
    (-model.log_prob(x, c).mean()).backward()
    assert c.grad is not None and c.grad.abs().max() > 0


def _conditional_gaussian(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``c ~ U(-2, 2)``, ``x | c ~ N((c, c^2 / 2 - 1), diag(0.3 + 0.2 |c|)^2)``."""
    c = 4 * torch.rand(n, 1, generator=gen, dtype=torch.float64) - 2
    mean = torch.cat([c, c.square() / 2 - 1], 1)
    std = 0.3 + 0.2 * c.abs()
    return mean + std * torch.randn(n, 2, generator=gen, dtype=torch.float64), c


def _true_log_prob(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    mean = torch.cat([c, c.square() / 2 - 1], 1)
    std = 0.3 + 0.2 * c.abs()
    return (-0.5 * ((x - mean) / std).square() - std.log() - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize("name", ["maf", "nsf-c"])
def test_a_fitted_conditional_density_matches_the_true_one(name):
    """Fitted to 4000 draws, the conditional density's KL from the truth (estimated on
    fresh draws) is small, and far below that of a flow that ignores the context."""
    torch.manual_seed(0)
    cfg = {"maf": MAFConfig(dim=2, n_flows=4, hidden=(32, 32), context_features=1),
           "nsf-c": NSFConfig(dim=2, n_flows=3, hidden=32, blocks=1, bins=8, bound=4.0,
                              context_features=1)}[name]  # fmt: skip
    model = build_model(cfg).double()
    gen = torch.Generator().manual_seed(1)
    x, c = _conditional_gaussian(4000, gen)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(600):
        i = torch.randint(0, len(x), (256,), generator=gen)
        loss = -model.log_prob(x[i], c[i]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, ct = _conditional_gaussian(4000, gen)
    with torch.no_grad():
        kl = float((_true_log_prob(xt, ct) - model.log_prob(xt, ct)).mean())
        shuffled = float((_true_log_prob(xt, ct) - model.log_prob(xt, ct.flip(0))).mean())
    print(f"{name}: KL {kl:.4f}, with shuffled contexts {shuffled:.3f}")
    assert -0.02 < kl < 0.1, kl  # KL >= 0 up to the estimate's noise
    assert shuffled > 10 * max(kl, 0.05), (kl, shuffled)


# ---- flows as torch distributions ---------------------------------------------------------
def test_an_unconditional_flow_as_a_distribution():
    torch.manual_seed(0)
    flow = build_model(MAFConfig(dim=2, n_flows=2, hidden=(8,))).eval()
    d = as_distribution(flow, validate_args=True)
    assert d.batch_shape == () and d.event_shape == (2,)
    x = d.sample((4, 5))
    assert x.shape == (4, 5, 2) and not x.requires_grad
    lp = d.log_prob(x)
    assert lp.shape == (4, 5)
    torch.testing.assert_close(lp, flow.log_prob(x.reshape(-1, 2)).reshape(4, 5))
    assert d.sample().shape == (2,) and d.log_prob(torch.zeros(2)).shape == ()
    r = d.rsample((3,))
    r.sum().backward()
    assert any(p.grad is not None for p in flow.parameters())
    with pytest.raises(ValueError):  # torch's own check of the event shape
        d.log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="takes no context"):
        as_distribution(flow, torch.zeros(4, 1))


def test_a_conditional_flow_as_a_batch_of_distributions():
    torch.manual_seed(0)
    flow = _model("nsf-c").float()
    c = torch.randn(6, K)
    d = as_distribution(flow, c, validate_args=True)
    assert d.batch_shape == (6,) and d.event_shape == (3,)
    x = d.sample((5,))  # n per context row
    assert x.shape == (5, 6, 3)
    lp = d.log_prob(x)
    assert lp.shape == (5, 6)
    torch.testing.assert_close(lp[2], flow.log_prob(x[2], c))
    one = torch.randn(3)  # broadcast over the batch
    torch.testing.assert_close(d.log_prob(one), flow.log_prob(one.expand(6, 3), c))
    e = as_distribution(flow, c[:1]).expand((4,))
    assert e.batch_shape == (4,) and e.sample((2,)).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="this flow is conditional"):
        as_distribution(flow)


def test_a_flow_distribution_agrees_with_torch_on_a_gaussian():
    """A flow that is exactly a Gaussian (an untrained MAF: the identity) gives torch's
    own MultivariateNormal log-density."""
    flow = build_model(MAFConfig(dim=2, n_flows=1, hidden=(8,))).double().eval()
    d = as_distribution(flow)
    x = torch.randn(7, 2, dtype=torch.float64)
    ref = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(d.log_prob(x), ref.log_prob(x))


def test_image_flows_are_not_wrapped():
    from resflow.models import get_preset

    with pytest.raises(ValueError, match="wraps flows of real vectors"):
        as_distribution(build_model(get_preset("glow-digits")))


# ---- data files with context columns, through the command line ----------------------------
def _table(path, n: int = 1200) -> None:
    import numpy as np

    gen = torch.Generator().manual_seed(3)
    x, c = _conditional_gaussian(n, gen)
    np.savetxt(path, torch.cat([c, x], 1).numpy(), delimiter=",", header="c,x0,x1",
               comments="")  # fmt: skip


def test_train_on_a_table_whose_chosen_columns_are_the_context(tmp_path, capsys):
    from resflow.cli import main
    from resflow.data import load_data
    from resflow.runs import RunFolder

    table = tmp_path / "table.csv"
    _table(table)
    split = load_data(str(table), context_columns=(0,))
    assert split.shape == (2,) and split.context_features == 1
    assert split.valid_context is not None and len(split.valid_context) == len(split.valid)
    run = tmp_path / "run"
    code = main(["train", "--model", "maf", "--data", str(table), "--context-columns", "[0]",
                 "--steps", "30", "--batch-size", "128", "--eval-every", "30", "--out", str(run),
                 "--no-progress", "--no-tensorboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "nats" in out, out
    model = RunFolder(run).load_model()
    assert model.context_features == 1
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0  # the test contexts
    assert main(["check", "--run", str(run), "--n", "32"]) == 0
    capsys.readouterr()
    code = main(["sample", "--run", str(run), "--out", str(tmp_path / "s.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "conditional on a context of 1 feature(s)" in err
    assert len(err.strip().splitlines()) == 1


def test_train_and_check_a_conditional_residual_flow_on_a_table(tmp_path, capsys):
    from resflow.cli import main

    table = tmp_path / "table.csv"
    _table(table, 600)
    run = tmp_path / "run"
    code = main(["train", "--model", "residual-flow-vector", "--data", str(table),
                 "--context-columns", "[0]", "--set", "n_blocks=2", "--set", "hidden=[16]",
                 "--steps", "20", "--batch-size", "64", "--eval-every", "20", "--out", str(run),
                 "--no-progress", "--no-tensorboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "nats" in out, out
    assert main(["check", "--run", str(run), "--n", "32"]) == 0
    out = capsys.readouterr().out
    assert "certificate: PASSED" in out and "2 residual block(s)" in out, out


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ("[5]", r"context_columns \(5,\): .* has column\(s\) \[5\] beyond its 3"),
        ("[0,1,2]", "no column of .* is left as data"),
        ("[1,1]", "a column named twice"),
    ],
)
def test_bad_context_columns_are_refused_in_one_line(tmp_path, capsys, columns, message):
    import re

    from resflow.cli import main

    table = tmp_path / "table.csv"
    _table(table, 100)
    code = main(["train", "--model", "maf", "--data", str(table), "--context-columns", columns,
                 "--steps", "2", "--out", str(tmp_path / "r"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_context_columns_belong_to_matrix_files_only():
    from resflow.data import load_data

    with pytest.raises(ValueError, match="only a matrix file .* has context columns"):
        load_data("8gaussians", context_columns=(0,))
