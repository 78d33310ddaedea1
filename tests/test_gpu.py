"""On a CUDA device, the same numbers as on the CPU: the exact 2-D logdet and its
gradients, the backward pass that reads the device once, bf16 and compiled kernels, and
exact resume. Skipped where there is no CUDA device."""

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
    from resflow.layers.residual.logdet import LogdetEstimator
    from resflow.nets import residual_mlp

    torch.manual_seed(5)
    g = residual_mlp(2, (8, 8), coeff=0.9).double().to(CUDA)
    block = ResidualBlock(g)
    block.train_estimator = LogdetEstimator(method=method)
    x = torch.randn(6, 2, dtype=torch.float64, device=CUDA)
    block(x)
    assert not logdet_module.reads_are_free(x)
    loss_fn = lambda y, ld: (y.pow(2).sum(1) - ld).mean()  # noqa: E731
    assert_same_grads(*grads_by_read_path(monkeypatch, block, x, loss_fn))
    _, ld = block(x)
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        (ld * torch.arange(1.0, 7.0, dtype=torch.float64, device=CUDA)).sum().backward()
    assert not logdet_module._pending


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
