"""Training from Python gives what the command line gives: a preset's recommended
settings unless changed, ``grad_clip=0`` turns clipping off, and it is explicit which
weights (raw or EMA) each call uses."""

from __future__ import annotations

import pytest
import torch

from resflow.config import ConfigError
from resflow.data import load_data
from resflow.evaluation import evaluate
from resflow.models import PRESETS, get_preset, recommended_training
from resflow.train_config import TrainConfig
from resflow.training import Trainer


@pytest.fixture(scope="module")
def data():
    return load_data("8gaussians", n_train=1024, n_test=128)


def test_a_preset_trains_with_its_recommended_settings(data, tmp_path):
    trainer = Trainer(get_preset("toy2d"), data, out_dir=tmp_path / "a")
    assert trainer.cfg == PRESETS.get("toy2d").train and trainer.settings_from == "toy2d"
    assert trainer.cfg.lr == 1e-2 and trainer.cfg.warmup == 1  # not TrainConfig()'s
    changed = Trainer(get_preset("toy2d"), data, {"steps": 3}, tmp_path / "b")
    assert changed.cfg == PRESETS.get("toy2d").train.__class__(
        **{**vars(PRESETS.get("toy2d").train), "steps": 3}
    )
    whole = Trainer(get_preset("toy2d"), data, TrainConfig(steps=3), tmp_path / "c")
    assert whole.cfg == TrainConfig(steps=3) and whole.settings_from is None
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        Trainer(get_preset("toy2d"), data, {"lr": -1.0}, tmp_path / "d")


def test_a_changed_preset_keeps_the_settings_of_the_preset_it_came_from():
    train, name = recommended_training(get_preset("maf-toy2d", n_flows=2))
    assert name == "maf-toy2d" and train == PRESETS.get("maf-toy2d").train
    from resflow.models.glow import GlowVectorConfig

    assert recommended_training(GlowVectorConfig(dim=7, depth=1))[1] == "glow-toy2d"


def _train(data, tmp_path, clip: float, name: str) -> torch.Tensor:
    cfg = TrainConfig(steps=3, lr=0.05, warmup=0, batch_size=64, grad_clip=clip,
                      tensorboard=False, progress=False, eval_every=100)  # fmt: skip
    trainer = Trainer(get_preset("maf-toy2d"), data, cfg, tmp_path / name)
    trainer.fit()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_grad_clip_zero_turns_clipping_off(data, tmp_path):
    off = _train(data, tmp_path, 0.0, "off")
    huge = _train(data, tmp_path, 1e12, "huge")  # never reached: the same as none
    tight = _train(data, tmp_path, 1e-3, "tight")
    torch.testing.assert_close(off, huge, rtol=0, atol=0)
    assert (off - tight).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="grad_clip: must be >= 0"):
        TrainConfig(grad_clip=-1.0)


def test_which_weights_each_call_uses(data, tmp_path):
    cfg = TrainConfig(steps=20, lr=1e-2, warmup=0, batch_size=64, ema_decay=0.9,
                      tensorboard=False, progress=False, eval_every=100)  # fmt: skip
    trainer = Trainer(get_preset("maf-toy2d"), data, cfg, tmp_path / "w")
    trainer.fit()
    raw = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    averaged = trainer.averaged_model()
    assert not averaged.training
    for k, v in trainer.model.state_dict().items():  # the trained model keeps its weights
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)
    x = data.test
    with torch.no_grad():
        by_ema = trainer.evaluate()
        by_raw = trainer.evaluate(weights="raw")
        trainer.model.eval()
        direct_raw = evaluate(trainer.model, x, 256)
        direct_avg = evaluate(averaged, x, 256)
    assert by_raw.mean == pytest.approx(direct_raw.mean, abs=1e-6)
    assert by_ema.mean == pytest.approx(direct_avg.mean, abs=1e-6)
    assert by_ema.mean != pytest.approx(by_raw.mean, abs=1e-4)
    torch.manual_seed(0)
    assert trainer.sample(4, weights="raw").shape == (4, 2)
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw'"):
        trainer.evaluate(weights="best")
