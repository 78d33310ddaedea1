"""A steady-state training step reads nothing on the host (on a GPU each read waits for
the device): the value checks are deferred and read together at the logged steps, and
a divergence found there still names the step where it happened."""

import collections
import contextlib
import math
import sys

import pytest
import torch

from resflow.data import DataConfig
from resflow.layers.residual import in_forward
from resflow.models import get_preset
from resflow.training import MaximumLikelihood, TrainConfig, Trainer
from resflow.value_checks import DeferredChecks, deferred, require

from helpers import NanAfter

READS = ("item", "__float__", "__int__", "__bool__", "tolist")


@contextlib.contextmanager
def counting_reads(per_step: collections.Counter, trainer: Trainer):
    """Count host reads of tensor values, by the trainer's step in progress."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(original):
        def read(self, *args, **kwargs):
            # the roulette's term counts come from the host's generator: reading them
            # waits for no device
            if sys._getframe(1).f_code.co_name != "draw_terms":
                per_step[trainer.step] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


SMALL = {
    "toy2d": dict(n_blocks=2, hidden=(16, 16)),
    "iresnet-toy2d": dict(n_blocks=2, hidden=(16, 16)),
    # convolutions, the closed-form Neumann gradient in the forward pass, the roulette
    "digits-small": dict(n_blocks=(1, 1), hidden=8, fc_blocks=1, fc_hidden=(16,)),
}


@pytest.mark.parametrize(
    "preset, data",
    [("toy2d", "8gaussians"), ("iresnet-toy2d", "8gaussians"), ("digits-small", "digits")],
)
def test_steady_state_steps_read_nothing_on_the_host(tmp_path, monkeypatch, preset, data):
    """With a fixed number of power iterations (the authors' setting), the only reads are
    at the steps that log (every 5th here) and certify the Lipschitz bounds (every 4th).
    The code runs as on an accelerator: the reads it makes only where they are free (on
    the CPU) are off."""
    monkeypatch.setattr(in_forward, "reads_are_free", lambda t: False)
    model = get_preset(preset, **SMALL[preset], power_iterations=3, certify_every=4)
    train = TrainConfig(steps=100, batch_size=64, log_every=5, eval_every=10**6,
                        checkpoint_every=10**6, tensorboard=False, progress=False)  # fmt: skip
    trainer = Trainer(model, DataConfig(name=data, n_train=512, n_test=64), train, tmp_path)
    trainer.fit(until=6)  # the lazy state, the first certificate
    per_step: collections.Counter = collections.Counter()
    with counting_reads(per_step, trainer):
        trainer.fit(until=26)
    # while step s + 1 runs the counter reads s: it certifies where (s + 1) % 4 == 0; a
    # logged step's records are written once the counter reads s + 1
    steady = [s for s in range(7, 25) if (s + 1) % 4 and s % 5]
    assert len(steady) >= 8
    assert {s: per_step[s] for s in steady} == dict.fromkeys(steady, 0)
    assert sum(per_step.values()) > 0  # the logged and certifying steps do read


def test_a_deferred_divergence_names_its_own_step(tmp_path):
    """The loss becomes NaN at step 6, the checks are read at step 10 (the logged step):
    the error names step 6 and the last checkpoint (step 5) stays the last finite one."""
    data = DataConfig(name="8gaussians", n_train=128, n_test=64)
    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    train = TrainConfig(steps=30, batch_size=32, log_every=10, checkpoint_every=5,
                        eval_every=100, tensorboard=False, progress=False)  # fmt: skip
    trainer = Trainer(cfg, data, train, tmp_path)
    trainer.objective = NanAfter(trainer.model, 6)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 6; .*\(step 5\)"):
        trainer.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 5


def test_bad_input_inside_the_loop_is_the_error_reported(tmp_path):
    """A batch with a NaN fails as bad input (not as a divergence), once read."""
    data = DataConfig(name="8gaussians", n_train=128, n_test=64)
    train = TrainConfig(steps=4, batch_size=32, eval_every=100, tensorboard=False,
                        progress=False)  # fmt: skip
    trainer = Trainer(get_preset("toy2d", n_blocks=1, hidden=(8,)), data, train, tmp_path)
    trainer.data.train[5, 0] = math.nan
    with pytest.raises(ValueError, match="input contains 1 non-finite value"):
        trainer.fit()


def test_per_sample_weights_on_the_in_forward_gradient_fail_when_read(tmp_path):
    """Inside the trainer the uniform-upstream check of backward-in-forward joins the
    step's deferred checks: a weighted loss still fails, with its own message."""

    class Weighted(MaximumLikelihood):
        def __call__(self, model, batch):
            ld = model.log_prob(batch.x)
            return -(ld * torch.linspace(0.5, 1.5, len(ld))).mean(), {}

    model = get_preset("digits-small", **SMALL["digits-small"])
    train = TrainConfig(steps=3, batch_size=16, eval_every=100, tensorboard=False,
                        progress=False)  # fmt: skip
    trainer = Trainer(model, DataConfig(name="digits", n_train=64, n_test=16), train, tmp_path)
    trainer.objective = Weighted(trainer.model)
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists()


def test_checks_outside_a_deferred_block_raise_at_once():
    with pytest.raises(ValueError, match="now"):
        require(torch.tensor(True), lambda: ValueError("now"))
    checks = DeferredChecks()
    with deferred(checks):
        require(torch.tensor(False), lambda: ValueError("never"))
    checks.verify()  # nothing set: no error, and the flags are gone
    assert len(checks) == 0
