"""Class-conditional flows: labels as context, clear errors, and samples of the class
asked for (a logistic-regression classifier trained on the digits recognises them)."""

from __future__ import annotations

import pytest
import torch

from resflow.data import load_data
from resflow.models import build_model, get_preset
from resflow.train_config import TrainConfig
from resflow.training import Trainer

_TRAIN = dict(batch_size=64, lr=2e-3, warmup=20, weight_decay=0.0, eval_every=10**6,
              checkpoint_every=10**6, ema_decay=0.9, progress=False, tensorboard=False)  # fmt: skip


@pytest.mark.parametrize(
    "preset,kw",
    [
        ("glow-digits", dict(depth=1, hidden=8)),
        ("realnvp-digits", dict(hidden=8, n_blocks=1)),
        ("digits-small", dict(n_blocks=(1, 1), hidden=8, fc_blocks=1, fc_hidden=(8,))),
    ],
)
def test_labels_change_the_density_and_are_checked(preset, kw):
    torch.manual_seed(0)
    model = build_model(get_preset(preset, n_classes=10, **kw))
    x = torch.randint(0, 17, (4, 1, 8, 8))
    model(x, torch.arange(4))  # data-dependent initialisation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    torch.manual_seed(1)
    a = model.log_prob(x, torch.tensor([0, 1, 2, 3]))
    torch.manual_seed(1)
    b = model.log_prob(x, torch.tensor([4, 5, 6, 7]))
    assert not torch.allclose(a, b)
    s = model.sample(3, context=torch.tensor([1, 1, 2]))
    assert s.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"class-conditional \(10 classes\): pass the labels"):
        model.log_prob(x)
    with pytest.raises(ValueError, match="class label 10 is out of range"):
        model.log_prob(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(TypeError, match="class labels must be integers"):
        model.log_prob(x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"expected 3 class labels"):
        model.sample(3, context=torch.tensor([1, 2]))


def test_trainer_refuses_unlabelled_data(tmp_path):
    data = load_data("digits")
    data.train_labels = None
    with pytest.raises(ValueError, match="has no labels"):
        Trainer(get_preset("glow-digits", n_classes=10, depth=1, hidden=8), data,
                TrainConfig(steps=1, **_TRAIN), tmp_path / "run")  # fmt: skip


def test_class_conditional_samples_are_of_their_class(tmp_path):
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    data = load_data("digits")
    cfg = get_preset("glow-digits", n_classes=10, depth=4, hidden=32)
    trainer = Trainer(cfg, data, TrainConfig(steps=150, **_TRAIN), tmp_path / "run")
    trainer.fit()
    clf = LogisticRegression(max_iter=2000)
    clf.fit(data.train.flatten(1).float().numpy(), data.train_labels.numpy())
    assert clf.score(data.test.flatten(1).float().numpy(), data.test_labels.numpy()) > 0.85
    labels = torch.arange(200) % 10
    model = trainer.model.eval()
    torch.manual_seed(1)
    with trainer.ema.swapped(model):
        x = model.sample(200, temperature=0.8, context=labels)
    accuracy = (clf.predict(x.flatten(1).float().numpy()) == labels.numpy()).mean()
    assert accuracy > 0.5, accuracy  # chance: 0.1 (measured: 0.93)
