"""Reduced-precision training: bf16 autocast (residual blocks stay fp32), tf32 on CUDA."""

import pytest
import torch

from resflow.data import load_data
from resflow.models import build_model, get_preset
from resflow.training import TrainConfig, Trainer


def _bpd(name, x, autocast):
    torch.manual_seed(0)
    model = build_model(get_preset(name))
    with torch.no_grad():
        model(x[:64])  # data-dependent initialization
    model.eval()
    out = []
    for bf16 in (False, True):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(model.bits_per_dim(x).float())
    return out


def test_residual_blocks_keep_fp32_under_bf16_autocast():
    """The power series cancels alternating terms; under autocast the blocks run in the
    weights' precision, so the log-density is fp32's exactly."""
    x = load_data("digits").test[:96]
    fp32, bf16 = _bpd("digits-small", x, True)
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0)


def test_bf16_log_density_of_a_coupling_flow_within_tolerance():
    """Glow's coupling networks run in bfloat16 under autocast; the log-density stays
    within 0.05 bits/dim of fp32 per image (0.01 on average) on the 8x8 digits."""
    x = load_data("digits").test[:96]
    fp32, bf16 = _bpd("glow-digits", x, True)
    diff = (bf16 - fp32).abs()
    assert diff.max() > 0  # bfloat16 arithmetic did happen
    assert diff.max() < 0.05
    assert diff.mean() < 0.01


def test_bf16_training_steps_and_tf32_needs_cuda(tmp_path):
    data = load_data("digits")
    cfg = get_preset("digits-small", n_blocks=(1, 1), fc_blocks=0)
    train = TrainConfig(steps=2, batch_size=16, eval_every=2, eval_max=32, precision="bf16",
                        tensorboard=False, progress=False)  # fmt: skip
    result = Trainer(cfg, data, train, tmp_path / "bf16").fit()
    assert result.final is not None and torch.isfinite(torch.tensor(result.final.mean))
    with pytest.raises(ValueError, match="tf32 needs a CUDA device"):
        Trainer(cfg, data, TrainConfig(precision="tf32", progress=False), tmp_path / "tf32")
