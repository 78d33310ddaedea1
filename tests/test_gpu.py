"""On a CUDA device, the same numbers as on the CPU: the exact 2-D logdet and its
gradients, the series estimator on the fused path, the backward pass that reads the
device once, bf16 and compiled kernels, and exact resume; and a steady-state training
step that never synchronizes with the host. Skipped where there is no CUDA device."""

import copy

import pytest
import torch

from resflow.data import load_data
from resflow.models import build_model, get_preset
from resflow.training import Batch, MaximumLikelihood, TrainConfig, Trainer

from helpers import assert_same_grads, grads_by_read_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _toy_model_and_data(dtype=torch.float64):
    torch.manual_seed(0)
    model = build_model(get_preset("toy2d", n_blocks=4, hidden=(32, 32))).to(dtype)
    x = load_data("8gaussians", n_train=512, n_test=64).train[:256].to(dtype)
    with torch.no_grad():
        model(x)  # data-dependent initialization
    return model, x


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss, _ = MaximumLikelihood(model)(model, Batch(x))
    loss.backward()
    grads = [None if p.grad is None else p.grad.detach().cpu() for p in model.parameters()]
    assert any(g is not None for g in grads)
    return loss.detach().cpu(), grads


def test_exact_2d_loss_and_gradients_equal_the_cpus():
    """float64 on both devices: the loss and every gradient of the exact-logdet 2-D model
    (shared rescaled weights, closed-form backward, device-side uniformity check)."""
    cpu, x = _toy_model_and_data()
    gpu = copy.deepcopy(cpu).to(CUDA)
    loss_c, grads_c = _loss_and_grads(cpu, x)
    loss_g, grads_g = _loss_and_grads(gpu, x.to(CUDA))
    torch.testing.assert_close(loss_g, loss_c, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads_g, grads_c):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-8)


@pytest.mark.parametrize("method", ["exact", "series"])
def test_device_side_backward_equals_the_host_reading_one(monkeypatch, method):
    """On CUDA the closed-form backward scales the pairs by the upstream gradient
    instead of reading it; forcing the host-reading path gives the same gradients, and
    per-sample weights on the logdet still raise once the pass ends."""
    import resflow.layers.residual.in_forward as logdet_module
    from resflow.layers import ResidualBlock
    from resflow.layers.residual import fused
    from resflow.layers.residual.logdet import LogdetEstimator
    from resflow.nets import residual_mlp

    torch.manual_seed(5)
    d = fused.MAX_DIM + 1  # wider than the fused path takes: the closed form
    g = residual_mlp(d, (8, 8), coeff=0.9).double().to(CUDA)
    block = ResidualBlock(g)
    block.train_estimator = LogdetEstimator(method=method)
    x = torch.randn(6, d, dtype=torch.float64, device=CUDA)
    block(x)
    assert not logdet_module.reads_are_free(x)
    loss_fn = lambda y, ld: (y.pow(2).sum(1) - ld).mean()  # noqa: E731
    assert_same_grads(*grads_by_read_path(monkeypatch, block, x, loss_fn))
    _, ld = block(x)
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        (ld * torch.arange(1.0, 7.0, dtype=torch.float64, device=CUDA)).sum().backward()
    assert not logdet_module._pending


@pytest.mark.parametrize("neumann", [False, True])
def test_fused_series_on_cuda_equals_the_general_path(neumann):
    """float64 on CUDA: the roulette series from the explicit 2x2 Jacobians gives the
    value and gradients of the autograd path with the same draws (the same seed on the
    same device), per-sample weights included."""
    from resflow.layers import ResidualBlock
    from resflow.layers.residual.logdet import LogdetEstimator
    from resflow.nets import residual_mlp

    torch.manual_seed(5)
    g = residual_mlp(2, (16, 16), coeff=0.9).double().to(CUDA)
    est = LogdetEstimator(dist="geometric", neumann_grad=neumann, grad_in_forward=False)
    block = ResidualBlock(g, train_estimator=est)
    x = torch.randn(32, 2, dtype=torch.float64, device=CUDA)
    block(x)
    weights = torch.linspace(0.5, 1.5, 32, dtype=torch.float64, device=CUDA)
    outs = []
    for path in ("autograd", "fused"):
        block.path = path
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y, ld = block(xg)
        loss = ((y.pow(2).sum(1) - ld) * weights).mean()
        grads = torch.autograd.grad(loss, [xg, *g.parameters()], allow_unused=True)
        outs.append([loss.detach().cpu()] + [None if t is None else t.cpu() for t in grads])
    for a, b in zip(*outs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-8)


@pytest.mark.parametrize("preset, data", [("toy2d", "8gaussians"), ("digits-small", "digits")])
def test_a_steady_state_training_step_does_not_synchronize(tmp_path, preset, data):
    """With a fixed number of power iterations, torch's synchronization debug mode sees
    no synchronization in the steps that neither log (every 5th) nor certify (every
    4th); the deferred checks and records are read at the logged steps."""
    import warnings

    from resflow.data import DataConfig

    small = {
        "toy2d": dict(n_blocks=2, hidden=(16, 16)),
        "digits-small": dict(n_blocks=(1, 1), hidden=8, fc_blocks=1, fc_hidden=(16,)),
    }[preset]
    model = get_preset(preset, **small, power_iterations=3, certify_every=4)
    train = TrainConfig(steps=100, batch_size=64, log_every=5, eval_every=10**6,
                        checkpoint_every=10**6, tensorboard=False, progress=False,
                        device="cuda")  # fmt: skip
    trainer = Trainer(model, DataConfig(name=data, n_train=512, n_test=64), train, tmp_path)
    trainer.fit(until=6)
    synced: list[int] = []

    def record(message, *args, **kwargs):
        synced.append(trainer.step)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            trainer.fit(until=26)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steady = [s for s in range(7, 25) if (s + 1) % 4 and s % 5]
    assert not [s for s in synced if s in steady], synced


def _bits_per_dim(name, x, bf16):
    torch.manual_seed(0)
    model = build_model(get_preset(name)).to(CUDA)
    with torch.no_grad():
        model(x[:64])
    model.eval()
    torch.manual_seed(1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        return model.bits_per_dim(x).float().cpu()


def test_bf16_on_cuda_keeps_residual_blocks_fp32_and_couplings_close():
    """Residual blocks keep fp32 under autocast: their bits/dim match fp32's to float32
    rounding (cuDNN may pick other kernels; bfloat16 arithmetic would differ by ~1e-3)."""
    x = load_data("digits").test[:96].to(CUDA)
    bf16, fp32 = (_bits_per_dim("digits-small", x, on) for on in (True, False))
    torch.testing.assert_close(bf16, fp32, rtol=1e-6, atol=1e-5)
    diff = (_bits_per_dim("glow-digits", x, True) - _bits_per_dim("glow-digits", x, False)).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.01


def test_compiled_kernels_on_cuda_give_the_same_step():
    """``--compile`` (Triton kernels on CUDA) changes no number beyond float32 rounding."""
    from resflow.layers.residual import kernels

    model, x = _toy_model_and_data(torch.float32)
    model, x = model.to(CUDA), x.to(CUDA)
    plain = _loss_and_grads(model, x)
    kernels.set_compile(True)
    try:
        fused = _loss_and_grads(model, x)
    finally:
        kernels.set_compile(False)
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fused[1], plain[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def _cfg(**kw):
    base = dict(steps=6, batch_size=64, warmup=2, eval_every=1000, checkpoint_every=3,
                tensorboard=False, progress=False, device="cuda")  # fmt: skip
    return TrainConfig(**(base | kw))


def test_resume_on_cuda_gives_the_same_weights(tmp_path):
    data = load_data("8gaussians", n_train=512, n_test=256)
    preset = get_preset("toy2d", n_blocks=2, hidden=(16, 16))
    full = Trainer(preset, data, _cfg(), tmp_path / "full").fit()
    Trainer(preset, data, _cfg(steps=3), tmp_path / "cut").fit()
    out = Trainer(preset, data, _cfg(), tmp_path / "cut", resume=True).fit()
    for (n, p), q in zip(full.model.state_dict().items(), out.model.state_dict().values()):
        assert p.device.type == "cuda"
        assert torch.equal(p, q), n


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_image_training_on_cuda_at_reduced_precision(tmp_path, precision):
    data = load_data("digits")
    cfg = get_preset("digits-small", n_blocks=(1, 1), fc_blocks=0)
    train = _cfg(steps=3, batch_size=32, eval_every=3, eval_max=64, precision=precision)
    result = Trainer(cfg, data, train, tmp_path).fit()
    assert result.final is not None and 0.5 < result.final.mean < 8
