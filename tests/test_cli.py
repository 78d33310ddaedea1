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
    assert "samples at T = 1, 0.7:" in out
    for name in ("samples.png", "curve.png", "best.pt", "last.pt", "config.yaml"):
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
    assert bad.returncode == 2 and "unknown option 'n_blockz' for ImageFlowConfig" in bad.stderr
    bad = resflow("eval", "--run", "/nonexistent", check=False)
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr


# Data that cannot be loaded: an error about the options proves they were checked first.
_NO_DATA = ["--data", "mnist", "--data-dir", "/nonexistent-resflow-data", "--steps", "1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "coeff=abc"], "coeff: expected a number, got 'abc'"),
        (["--set", "coeff=5"], "coeff: must be < 1, got 5"),
        (["--set", "actnorm=maybe"], "actnorm: expected true or false, got 'maybe'"),
        (["--set", "n_blocks=-1"], "n_blocks: expected a list of integers"),
        (["--set", "n_blocks=[2,-1]"], "n_blocks[1]: must be >= 1, got -1"),
        (["--set", "estimator.dist=often"], "estimator.dist: expected one of 'geometric'"),
        (["--set", "estimator.n_hutchinson=0"], "estimator.n_hutchinson: must be >= 1, got 0"),
        (["--set", "estimator.nope=1"], "unknown option 'estimator.nope' for EstimatorConfig"),
        (["--set", "coeff"], "--set expects key=value"),
        (["--lr", "abc"], "--lr: expected a number, got 'abc'"),
        (["--eval-max", "-1"], "--eval-max: must be >= 1, got -1"),
        (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_option_errors_come_before_any_data_is_loaded(args, message, capsys):
    """In-process (the same ``main`` as the console script; the subprocess tests above
    cover the process boundary)."""
    from resflow.cli import main

    try:
        code = main(["train", *_NO_DATA, *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_presets_are_listed_by_family():
    out = resflow("presets").stdout
    assert "residual-flow:" in out and "iresnet:" in out
    assert out.index("residual-flow:") < out.index("  digits-small") < out.index("iresnet:")
    assert out.index("iresnet:") < out.index("  iresnet-digits")


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"


@pytest.mark.parametrize(
    "run, printed",
    [
        ("img", "test 2.6527 +- 0.0127 bits/dim (n=297)"),
        ("vec", "test 4.2591 +- 0.0291 nats (n=128)"),
    ],
)
def test_runs_written_by_resflow_0_1_still_evaluate_the_same(run, printed):
    """The fixtures were trained with resflow 0.1; their README records its output."""
    assert printed in (FIXTURES / "README.md").read_text()
    out = resflow("eval", "--run", str(FIXTURES / run), "--no-progress").stdout
    assert printed in out


def test_damaged_checkpoint_is_refused_with_a_clear_message(tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "vec", run)
    state = torch.load(run / "best.pt", weights_only=True)
    state["model"] = {k: v for k, v in list(state["model"].items())[1:]}  # a missing key
    torch.save(state, run / "best.pt")
    bad = resflow("eval", "--run", str(run), check=False)
    assert bad.returncode == 2 and "does not fit its model config" in bad.stderr


def test_iresnet_prints_its_true_density_and_labels_the_papers_biased_figure(tmp_path):
    run = tmp_path / "ires"
    out = resflow("train", "--data", "digits", "--model", "iresnet", "--set", "n_blocks=[1,1]",
                  "--set", "hidden=8", "--steps", "3", "--batch-size", "32", "--eval-every", "3",
                  "--eval-max", "64", "--out", str(run), "--no-progress",
                  "--no-tensorboard").stdout  # fmt: skip
    assert "iresnet-digits (iresnet," in out and "bits/dim" in out
    final = [line for line in out.splitlines() if line.startswith("test ")][-1]
    assert "biased: series truncated after 5 terms" in final  # kept in the final result
    both = resflow("eval", "--run", str(run), "--max", "64", "--no-progress").stdout
    true = resflow("eval", "--run", str(run), "--max", "64", "--no-progress", "--set",
                   "estimator.biased_eval_terms=0").stdout  # fmt: skip
    assert "bits/dim (n=64)" in both and "bits/dim (n=64)" in true
    assert "biased: series truncated after 5 terms" in both and "biased" not in true
    assert both.split("bits/dim")[0] == true.split("bits/dim")[0]  # the true figure first
    refused = resflow("eval", "--run", str(run), "--no-progress", "--set",
                      "estimator.eval_dist=none", check=False)  # fmt: skip
    assert refused.returncode == 2 and "biased" in refused.stderr
    assert "Traceback" not in refused.stderr

    from resflow.layers import ResidualBlock
    from resflow.runs import RunFolder

    blocks = [m for m in RunFolder(run).load_model().modules() if isinstance(m, ResidualBlock)]
    assert {(b.train_estimator.dist, b.train_estimator.n_exact_terms) for b in blocks} == {
        ("none", 5)
    }  # trained on the paper's truncated series
    assert {(b.eval_estimator.dist, b.eval_estimator.n_exact_terms) for b in blocks} == {
        ("poisson", 20)
    }  # evaluated without bias
    assert {(b.biased_estimator.dist, b.biased_estimator.n_exact_terms) for b in blocks} == {
        ("none", 5)
    }


def test_a_run_trained_from_python_is_evaluated_and_sampled_by_the_cli(tmp_path):
    from resflow import DataConfig, TrainConfig, Trainer, get_preset

    run = tmp_path / "py"
    cfg = get_preset("digits-small", n_blocks=(1, 1), hidden=8, fc_blocks=1, fc_hidden=(8,))
    train = TrainConfig(steps=2, batch_size=32, eval_every=2, eval_max=32, tensorboard=False,
                        progress=False)  # fmt: skip
    Trainer(cfg, DataConfig(name="digits"), train, run).fit()
    ev = resflow("eval", "--run", str(run), "--max", "32", "--no-progress").stdout
    assert "bits/dim (n=32)" in ev
    png = tmp_path / "s.png"
    resflow("sample", "--run", str(run), "--n", "4", "--out", str(png))
    assert png.stat().st_size > 0
    more = resflow("train", "--preset", "digits-small", "--set", "n_blocks=[1,1]", "--set",
                   "hidden=8", "--set", "fc_blocks=1", "--set", "fc_hidden=[8]", "--steps", "3",
                   "--batch-size", "32", "--eval-every", "3", "--eval-max", "32", "--out",
                   str(run), "--resume", "--no-progress", "--no-tensorboard").stdout  # fmt: skip
    assert "test " in more
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 3


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


def test_sample_writes_arrays_and_a_scatter_for_2d_runs(tmp_path):
    run = tmp_path / "toy"
    resflow("train", "--data", "8gaussians", "--set", "n_blocks=1", "--set", "hidden=[8]",
            "--steps", "2", "--batch-size", "64", "--n-train", "256", "--n-test", "128",
            "--out", str(run), "--no-progress", "--no-tensorboard")  # fmt: skip
    out = resflow("sample", "--run", str(run), "--n", "300", "--out", str(tmp_path / "s.npy"),
                  "--check", "--threads", "1").stdout  # fmt: skip
    import numpy as np

    arr = np.load(tmp_path / "s.npy")
    assert arr.shape == (300, 2) and np.isfinite(arr).all()
    assert (tmp_path / "s.png").stat().st_size > 0 and "worst round-trip error" in out
    resflow("sample", "--run", str(run), "--n", "7", "--out", str(tmp_path / "s.csv"),
            "--overwrite")  # its scatter replaces s.png  # fmt: skip
    assert np.loadtxt(tmp_path / "s.csv", delimiter=",").shape == (7, 2)
    bad = resflow("sample", "--run", str(run), "--out", str(tmp_path / "s.txt"), check=False)
    assert bad.returncode == 2 and "writes .npy, .csv or (2-D) .png" in bad.stderr


def test_conditional_run_and_latent_tools(tmp_path):
    run = tmp_path / "run"
    tiny = ["--set", "hidden=8", "--set", "n_blocks=1"]
    out = resflow("train", "--preset", "realnvp-digits", *tiny, "--conditional", "--steps", "3",
                  "--batch-size", "32", "--eval-every", "3", "--out", str(run), "--no-progress",
                  "--no-tensorboard").stdout  # fmt: skip
    assert "bits/dim" in out
    s = resflow("sample", "--run", str(run), "--label", "3", "--n", "4", "--out",
                str(tmp_path / "s.png")).stdout  # fmt: skip
    assert "4 samples of class 3 (1x8x8)" in s
    bad = resflow("sample", "--run", str(run), "--label", "10", check=False)
    assert bad.returncode == 2 and "--label 10 is out of range" in bad.stderr
    m = resflow("interpolate", "--run", str(run), "--manifold", "--steps", "3", "--out",
                str(tmp_path / "m.png")).stdout  # fmt: skip
    assert "3x3 manifold" in m and (tmp_path / "m.png").exists()
    c = resflow("compress", "--run", str(run), "--n", "2", "--out", str(tmp_path / "c.png")).stdout
    assert "keeping 100%, 50%" in c and (tmp_path / "c.png").exists()
    assert "certificate: PASSED" in resflow("check", "--run", str(run), "--n", "8").stdout
    # the class-conditional prior is per position: no other resolution
    big = resflow("sample", "--run", str(run), "--size", "16x16", check=False)
    assert big.returncode == 2 and "not fully convolutional" in big.stderr


def test_unconditional_realnvp_samples_at_a_larger_size(tmp_path):
    run = tmp_path / "run"
    resflow("train", "--preset", "realnvp-digits", "--set", "hidden=8", "--set", "n_blocks=1",
            "--steps", "2", "--batch-size", "32", "--eval-every", "2", "--out", str(run),
            "--no-progress", "--no-tensorboard")  # fmt: skip
    s = resflow("sample", "--run", str(run), "--size", "16x16", "--n", "4", "--out",
                str(tmp_path / "big.png")).stdout  # fmt: skip
    assert "wrote 4 samples (1x16x16)" in s and (tmp_path / "big.png").exists()
    # activations beyond any memory: refused at once (it used to run until the OOM killer)
    huge = resflow("sample", "--run", str(run), "--size", "8192x8192", "--n", "8", "--out",
                   str(tmp_path / "huge.png"), check=False)  # fmt: skip
    assert huge.returncode == 2 and "--size 8192x8192 needs about" in huge.stderr
    assert not (tmp_path / "huge.png").exists()
    bad = resflow("sample", "--run", str(run), "--label", "1", check=False)
    assert bad.returncode == 2 and "not class-conditional" in bad.stderr
    bad = resflow("train", "--data", "8gaussians", "--preset", "realnvp-toy2d", "--conditional",
                  "--steps", "1", "--out", str(tmp_path / "t"), check=False)  # fmt: skip
    assert bad.returncode == 2 and "has no class-conditional form" in bad.stderr


def test_naf_on_a_tabular_benchmark_with_early_stopping(tmp_path):
    """POWER from a synthetic file of the archive's format; validation split and
    ``--patience`` come with the benchmark; log-likelihood printed beside the paper's."""
    import numpy as np

    (tmp_path / "power").mkdir()
    rng = np.random.default_rng(0)
    np.save(tmp_path / "power" / "data.npy", rng.normal(size=(1500, 8)))
    run = tmp_path / "run"
    out = resflow("train", "--data", "power", "--data-dir", str(tmp_path), "--model", "naf",
                  "--set", "hidden=[16]", "--set", "n_flows=2", "--set", "sigmoid_units=4",
                  "--steps", "6", "--batch-size", "64", "--eval-every", "2", "--patience", "1",
                  "--out", str(run), "--no-progress", "--no-tensorboard").stdout  # fmt: skip
    assert "naf-power" in out and "(6,)" in out and "validation" in out
    assert "test log-likelihood" in out and "(NAF-DDSF(5) in its paper: 0.62)" in out
    ev = resflow("eval", "--run", str(run), "--data-dir", str(tmp_path), "--no-progress").stdout
    assert "test log-likelihood" in ev
    bad = resflow("train", "--data", "gas", "--data-dir", str(tmp_path), "--model", "maf",
                  "--steps", "1", check=False)  # fmt: skip
    assert bad.returncode == 2 and "GAS is not here" in bad.stderr and "--download" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_vi_fits_a_target_by_reverse_kl(tmp_path):
    out = resflow("vi", "--target", "banana", "--model", "naf", "--set", "n_flows=1",
                  "--set", "hidden=[16]", "--steps", "30", "--batch-size", "64", "--n-eval",
                  "500", "--out", str(tmp_path), "--no-progress").stdout  # fmt: skip
    assert "reverse KL" in out and "KL " in out and "ESS" in out
    assert (tmp_path / "fit.png").exists() and (tmp_path / "result.json").exists()
    f = tmp_path / "f"
    funnel = resflow("vi", "--target", "funnel", "--dim", "4", "--model", "maf", "--steps",
                     "5", "--n-eval", "200", "--out", str(f), "--no-progress")  # fmt: skip
    assert "4-D" in funnel.stdout and not (f / "fit.png").exists()
    bad = resflow("vi", "--target", "banana", "--model", "glow", "--preset", "glow-cifar10",
                  "--steps", "1", check=False)  # fmt: skip
    assert bad.returncode == 2 and "needs a vector model" in bad.stderr


def test_tarflow_train_eval_and_sample_denoised_with_guidance(tmp_path, capsys):
    """Noise mode, class-conditional: eval says the likelihood is of the noisy data;
    sample --denoise --guidance --label (in-process: a few seconds)."""
    from resflow.cli import main

    run = tmp_path / "run"
    tiny = ["--set", "width=16", "--set", "n_blocks=2", "--set", "depth=1", "--set", "heads=2",
            "--set", "noise_std=0.2"]  # fmt: skip
    assert main(["train", "--data", "digits", "--model", "tarflow", *tiny, "--conditional",
                 "--steps", "3", "--batch-size", "32", "--eval-every", "3", "--n-samples", "4",
                 "--out", str(run), "--no-progress", "--no-tensorboard"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "tarflow-digits" in out and "bits/dim" in out
    test_line = next(line for line in out.splitlines() if line.startswith("test "))
    assert "of the noisy data" in test_line  # the training run's own report says so too
    assert "one-step denoising" in out and (run / "samples_denoised.png").exists()
    assert main(["eval", "--run", str(run), "--max", "32", "--no-progress"]) == 0
    assert "bits/dim (n=32), of the noisy data" in capsys.readouterr().out
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(run), "--n", "4", "--label", "3", "--denoise",
                 "--guidance", "2", "--out", str(png)]) == 0  # fmt: skip
    assert "4 samples of class 3 with guidance 2, denoised (1x8x8)" in capsys.readouterr().out
    assert png.exists()
    assert main(["sample", "--run", str(run), "--n", "2", "--guidance", "0", "--out",
                 str(png), "--overwrite"]) == 0  # fmt: skip
    assert main(["sample", "--run", str(run), "--label", "1", "--guidance", "1", "--denoise",
                 "--size", "16x16", "--out", str(png), "--overwrite"]) == 2  # fmt: skip
    assert "not fully convolutional" in capsys.readouterr().err
