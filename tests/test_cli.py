"""The command line end to end, in subprocesses, with tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY_DIGITS = ["--set", "n_blocks=[1,1]", "--set", "hidden=8", "--set", "fc_blocks=1",
               "--set", "fc_hidden=[8]"]  # fmt: skip


def resflow(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "resflow.cli", *args], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"resflow {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_train_eval_sample_interpolate(tmp_path):
    run = tmp_path / "run"
    out = resflow("train", "--data", "digits", *TINY_DIGITS, "--steps", "4", "--batch-size",
                  "32", "--eval-every", "4", "--out", str(run), "--no-progress").stdout  # fmt: skip
    assert "test " in out and "bits/dim" in out
    for name in ("samples.png", "curve.png", "best.pt", "last.pt", "config.yaml", "data.yaml"):
        assert (run / name).exists(), name
    ev = resflow("eval", "--run", str(run), "--max", "64", "--no-progress").stdout
    assert "bits/dim (n=64)" in ev
    png = tmp_path / "s.png"
    resflow("sample", "--run", str(run), "--n", "9", "--temperature", "0.7", "--out", str(png))
    from PIL import Image

    assert Image.open(png).size[0] > 8
    resflow("interpolate", "--run", str(run), "--pairs", "2", "--steps", "5", "--out",
            str(tmp_path / "i.png"))  # fmt: skip
    assert (tmp_path / "i.png").exists()


def test_train_on_toy_2d_writes_density_plot(tmp_path):
    out = resflow("train", "--data", "8gaussians", "--set", "n_blocks=2", "--set", "hidden=[16]",
                  "--steps", "3", "--batch-size", "64", "--n-train", "256", "--n-test", "128",
                  "--out", str(tmp_path), "--no-progress", "--no-tensorboard").stdout  # fmt: skip
    assert "nats" in out and "entropy of the data" in out
    assert (tmp_path / "density.png").exists()


def test_clear_errors():
    bad = resflow("train", "--data", "nope", check=False)
    assert bad.returncode == 2 and "unknown data set 'nope'" in bad.stderr
    bad = resflow("train", "--set", "n_blockz=3", "--steps", "1", check=False)
    assert bad.returncode == 2 and "unknown model option 'n_blockz'" in bad.stderr
    bad = resflow("eval", "--run", "/nonexistent", check=False)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_training_resumes_to_the_same_weights(tmp_path):
    args = ["train", "--data", "8gaussians", "--set", "n_blocks=2", "--set", "hidden=[16]",
            "--batch-size", "64", "--n-train", "512", "--n-test", "64", "--checkpoint-every",
            "1", "--eval-every", "1000", "--no-progress", "--no-tensorboard"]  # fmt: skip
    steps = "60"
    resflow(*args, "--steps", steps, "--out", str(tmp_path / "full"))
    cut = tmp_path / "cut"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "resflow.cli", *args, "--steps", steps, "--out", str(cut)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (cut / "last.pt").exists() and proc.poll() is None:
            time.sleep(0.3)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 1 <= step < 60, "the kill should land mid-run"
    resflow(*args, "--steps", steps, "--out", str(cut), "--resume")
    full, resumed = _state(tmp_path / "full"), _state(cut)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
