"""The run folder: configs with resolved data paths, reloading from anywhere."""

import os

import numpy as np
import pytest
import torch
import yaml

from resflow import DataConfig, TrainConfig, Trainer, get_preset
from resflow.checkpoint import CheckpointError
from resflow.runs import RunFolder

_TRAIN = TrainConfig(steps=2, batch_size=32, eval_every=2, tensorboard=False, progress=False)


def test_relative_data_paths_are_stored_resolved(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.save(data_dir / "points.npy", np.random.default_rng(0).normal(size=(200, 2)))
    monkeypatch.chdir(data_dir)
    run = tmp_path / "run"
    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    Trainer(cfg, DataConfig(name="points.npy"), _TRAIN, run).fit()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["data"]["name"] == str(data_dir / "points.npy")
    monkeypatch.chdir(tmp_path)  # elsewhere: the same file is read, not ./points.npy
    data = RunFolder(run).load_data()
    assert data.train.shape[1] == 2 and len(data.test) == 20
    assert RunFolder(run).read_config().model == cfg


def test_split_without_a_config_is_trained_but_not_reloadable(tmp_path):
    from resflow.data import DataSplit

    split = DataSplit(torch.randn(64, 2), torch.randn(16, 2), "mine")
    Trainer(get_preset("toy2d", n_blocks=1, hidden=(8,)), split, _TRAIN, tmp_path).fit()
    RunFolder(tmp_path).load_model()  # the model is fine
    with pytest.raises(CheckpointError, match="records no data set"):
        RunFolder(tmp_path).load_data()


def test_damaged_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("model: [1, 2\n")
    with pytest.raises(CheckpointError, match="damaged run record"):
        RunFolder(tmp_path).read_config()
    assert not os.path.exists(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        RunFolder(tmp_path).load_model()


def test_a_checkpoint_holds_the_one_layout_and_old_ones_still_read(tmp_path):
    """The trainer writes :class:`TrainingState` (format first), and a resflow 0.1
    checkpoint, which lacks the newer fields, reads as one with their defaults."""
    from pathlib import Path

    from resflow.checkpoint import FORMAT, RESUME_KEYS, TrainingState, load_checkpoint

    run = tmp_path / "run"
    Trainer(get_preset("toy2d", n_blocks=1, hidden=(8,)), DataConfig(name="8gaussians",
            n_train=64, n_test=32), _TRAIN, run).fit()  # fmt: skip
    state = load_checkpoint(run / "last.pt")
    assert list(state) == ["format", *TrainingState.ORDER, "checksum"]
    assert state["format"] == FORMAT and set(RESUME_KEYS) <= set(state)
    old = load_checkpoint(Path(__file__).parent / "fixtures" / "v1" / "vec" / "best.pt")
    assert "format" not in old and "best_step" not in old
    restored = TrainingState.from_checkpoint(old, "best.pt")
    assert (restored.best_step, restored.stale, restored.stopped_early) == (0, 0, False)
    with pytest.raises(CheckpointError, match="cannot be resumed: it lacks optimizer"):
        TrainingState.from_checkpoint({k: v for k, v in old.items() if k != "optimizer"}, "x")
