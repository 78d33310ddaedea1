import pytest
import torch

from resflow.layers.residual import kernels
from resflow.layers.residual.activations import LipSwish


@pytest.fixture
def compiling():
    kernels.set_compile(True)
    yield
    kernels.set_compile(False)


def _reference(z, beta):
    """``LipSwish`` and its two derivatives by autograd."""
    z = z.clone().requires_grad_(True)
    a = z * torch.sigmoid(beta * z) / 1.1
    (d1,) = torch.autograd.grad(a.sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    return a.detach(), d1.detach(), d2


def test_fused_lipswish_kernels_equal_autograd(compiling):
    """With compilation on (the fused kernel where this machine compiles, else the
    fallback), value and derivatives equal autograd's."""
    act = LipSwish()
    with torch.no_grad():
        act.b.fill_(0.3)
    z = torch.randn(2, 3, 5, 5, dtype=torch.float64) * 4
    a, d1, d2 = act.value_and_derivatives(z)
    ref = _reference(z, act.beta.detach())
    for got, want in zip((a, d1, d2), ref):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    _, d1_only, none = act.value_and_derivatives(z, second=False)
    assert none is None
    torch.testing.assert_close(d1_only, ref[1], atol=1e-12, rtol=1e-10)


def test_a_compiler_failure_warns_once_and_falls_back(compiling, monkeypatch):
    def broken(fn, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    fused = kernels.fusable(lambda x: x * 2 + 1)
    with pytest.warns(RuntimeWarning, match=r"compile of <lambda> failed.*no C\+\+ compiler"):
        out = fused(torch.ones(3))
    torch.testing.assert_close(out, torch.full((3,), 3.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fused(torch.zeros(2)), torch.ones(2))  # no second warning


def test_compile_is_off_unless_asked(monkeypatch):
    def never(fn, **kwargs):
        raise AssertionError("compiled while compilation is off")

    monkeypatch.setattr(torch, "compile", never)
    assert not kernels.compile_enabled()
    fused = kernels.fusable(lambda x: x + 1)
    torch.testing.assert_close(fused(torch.zeros(2)), torch.ones(2))


def test_train_config_compile_turns_fusion_on(tmp_path):
    from resflow.models import get_preset
    from resflow.training import TrainConfig, Trainer

    try:
        cfg = TrainConfig(steps=1, batch_size=8, compile=True, tensorboard=False, progress=False)
        Trainer(get_preset("toy2d", n_blocks=1, hidden=(8,)), _toy(), cfg, tmp_path / "r")
        assert kernels.compile_enabled()
    finally:
        kernels.set_compile(False)


def _toy():
    from resflow.data import DataSplit

    return DataSplit(torch.randn(32, 2), torch.randn(16, 2), "toy")
