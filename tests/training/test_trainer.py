import math

import pytest
import torch

from resflow.checkpoint import save_checkpoint
from resflow.data import DataSplit, load_data
from resflow.models import get_preset
from resflow.training import CheckpointError, TrainConfig, Trainer, load_checkpoint
from resflow.training.trainer import make_optimizer


def _tiny_vector():
    return get_preset("toy2d", n_blocks=2, hidden=(16, 16))


def _toy_data(n=512):
    return load_data("8gaussians", n_train=n, n_test=256)


def _cfg(**kw):
    base = dict(steps=6, batch_size=64, warmup=2, eval_every=1000, checkpoint_every=3,
                tensorboard=False, progress=False)  # fmt: skip
    return TrainConfig(**(base | kw))


def test_weight_decay_is_applied_outside_adam():
    model = torch.nn.Linear(3, 3)
    cfg = _cfg(lr=0.1, weight_decay=0.5)
    opt = make_optimizer(model, cfg)
    before = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    opt.step()
    # zero gradient: Adam's step is 0, the decoupled decay still shrinks the weights
    torch.testing.assert_close(model.weight.detach(), before * (1 - 0.1 * 0.5))


def test_training_applies_weight_decay(tmp_path):
    data = _toy_data()
    a = Trainer(_tiny_vector(), data, _cfg(steps=3, weight_decay=0.0), tmp_path / "a").fit()
    b = Trainer(_tiny_vector(), data, _cfg(steps=3, weight_decay=0.5), tmp_path / "b").fit()
    wa = torch.cat([p.flatten() for p in a.model.parameters() if p.requires_grad])
    wb = torch.cat([p.flatten() for p in b.model.parameters() if p.requires_grad])
    assert wb.norm() < wa.norm()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = _toy_data()
    full = Trainer(_tiny_vector(), data, _cfg(steps=6), tmp_path / "full").fit()
    Trainer(_tiny_vector(), data, _cfg(steps=3), tmp_path / "cut").fit()  # "killed" at 3
    resumed = Trainer(_tiny_vector(), data, _cfg(steps=6), tmp_path / "cut", resume=True)
    assert resumed.step == 3
    out = resumed.fit()
    for (n, p), q in zip(full.model.state_dict().items(), out.model.state_dict().values()):
        assert torch.equal(p, q), n
    for n in full.ema.shadow:
        assert torch.equal(full.ema.shadow[n], out.ema.shadow[n]), n


def test_resume_refuses_a_different_model(tmp_path):
    data = _toy_data()
    Trainer(_tiny_vector(), data, _cfg(steps=3), tmp_path).fit()
    other = get_preset("toy2d", n_blocks=3, hidden=(16, 16))
    with pytest.raises(ValueError, match="different model config"):
        Trainer(other, data, _cfg(steps=6), tmp_path, resume=True)


def test_brief_training_lowers_8gaussians_test_nll(tmp_path):
    torch.manual_seed(0)
    data = load_data("8gaussians", n_train=20_000, n_test=2000)
    cfg = _cfg(steps=150, batch_size=256, lr=5e-3, warmup=10, eval_every=150,
               checkpoint_every=150, ema_decay=0.9)  # fmt: skip
    trainer = Trainer(get_preset("toy2d", n_blocks=4, hidden=(64, 64)), data, cfg, tmp_path)
    before = trainer.evaluate().mean
    after = trainer.fit().final
    assert after is not None and after.mean < before - 0.15, (before, after)


def test_tiny_image_model_learns_on_real_mnist(tmp_path, mnist_dir):
    data = load_data("mnist", mnist_dir)
    data = DataSplit(data.train[:1024], data.test[:64], "mnist", data.levels)
    model_cfg = get_preset("mnist-small", n_blocks=(1, 1, 1), hidden=16, fc_blocks=1,
                           fc_hidden=(16,))  # fmt: skip
    cfg = _cfg(
        steps=20, batch_size=32, lr=1e-2, warmup=1, eval_every=20, checkpoint_every=20, log_every=1
    )
    result = Trainer(model_cfg, data, cfg, tmp_path).fit()
    # step 1 is the ActNorm initialisation batch (normalised exactly); compare after it
    losses = torch.tensor([h["loss"] for h in result.history])
    assert losses[-5:].mean() < losses[1:6].mean() - 0.1, losses
    assert result.final is not None and math.isfinite(result.final.mean)
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert (tmp_path / "best.pt").exists() and (tmp_path / "config.yaml").exists()


def test_bad_data_shape_and_size(tmp_path):
    data = _toy_data()
    with pytest.raises(ValueError, match="does not match the model"):
        Trainer(get_preset("toy2d", dim=3), data, _cfg(), tmp_path)
    small = DataSplit(data.train[:10], data.test, "x")
    with pytest.raises(ValueError, match="fewer than the batch size"):
        Trainer(_tiny_vector(), small, _cfg(), tmp_path)


def test_checkpoints_are_plain_and_atomic(tmp_path):
    Trainer(_tiny_vector(), _toy_data(), _cfg(steps=3), tmp_path).fit()
    state = load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    assert state["step"] == 3
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "bad.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a resflow checkpoint"):
        save_checkpoint({"x": 1}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


def _scripted_evaluate(valid, test):
    """``Trainer.evaluate`` returning the scores given, one per evaluation and split."""
    from resflow.evaluation import EvalResult

    calls = {"valid": iter(valid), "test": iter(test)}

    def evaluate(self, max_examples=None, progress=False, split="test"):
        return EvalResult(next(calls[split]), 0.01, 10, "nats")

    return evaluate


def test_early_stopping_keeps_the_best_validation_checkpoint(tmp_path, monkeypatch):
    data = load_data("8gaussians", n_train=512, n_test=256, n_valid=128)
    valid = [5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 3.0]
    test = [5.5, 4.4, 4.0, 3.9, 3.8, 3.0, 3.0]  # the test score never decides
    monkeypatch.setattr(Trainer, "evaluate", _scripted_evaluate(valid, test))
    cfg = _cfg(steps=7, eval_every=1, patience=3, checkpoint_every=100)
    trainer = Trainer(_tiny_vector(), data, cfg, tmp_path / "run")
    result = trainer.fit()
    assert trainer.step == 5 and trainer.stopped_early and trainer.best_step == 2
    assert result.final is not None and result.final.mean == 4.4  # test at the best step
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] == 2 and load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 5
    for name, p in trainer.model.state_dict().items():  # the best weights are kept
        assert torch.equal(p, best["model"][name]), name
    assert (tmp_path / "run" / "curve.png").exists()
    # a resumed early-stopped run stays stopped
    again = Trainer(_tiny_vector(), data, cfg, tmp_path / "run", resume=True)
    assert again.fit().step == 5


def test_best_checkpoint_follows_validation_not_test(tmp_path, monkeypatch):
    data = load_data("8gaussians", n_train=512, n_test=256, n_valid=128)
    monkeypatch.setattr(Trainer, "evaluate", _scripted_evaluate([3.0, 4.0], [5.0, 1.0]))
    trainer = Trainer(_tiny_vector(), data, _cfg(steps=2, eval_every=1), tmp_path / "run")
    trainer.fit()
    assert trainer.best_step == 1 and load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 1


def test_patience_needs_a_validation_split(tmp_path):
    with pytest.raises(ValueError, match="no validation split.*--n-valid"):
        Trainer(_tiny_vector(), _toy_data(), _cfg(patience=2), tmp_path / "run")
    trainer = Trainer(_tiny_vector(), _toy_data(), _cfg(), tmp_path / "run2")
    with pytest.raises(ValueError, match="no validation split"):
        trainer.evaluate(split="valid")
