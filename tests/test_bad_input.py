"""Bad input, careless use and broken models: each gets one clear line, a non-zero exit
(or a specific exception from the library), and nothing on disk changes that should not.
"""

from __future__ import annotations

import math
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from resflow import DataConfig, TrainConfig, Trainer, build_model, get_preset
from resflow.checkpoint import CheckpointError, save_checkpoint
from resflow.cli import main
from resflow.runs import RunExistsError, RunFolder, RunLockedError

from helpers import NanAfter

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1"
TINY_VEC = ["--data", "8gaussians", "--set", "n_blocks=1", "--set", "hidden=[8]",
            "--n-train", "128", "--n-test", "64", "--batch-size", "32", "--no-progress",
            "--no-tensorboard"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and modification time."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture
def trained(tmp_path_factory) -> Path:
    """A small finished 2-D run (shared by the tests that only read it)."""
    run = tmp_path_factory.mktemp("runs") / "vec"
    assert main(["train", *TINY_VEC, "--steps", "4", "--eval-every", "4", "--out", str(run)]) == 0
    return run


# ---- work that must not be lost ---------------------------------------------------------
def test_a_second_train_into_a_run_is_refused_unless_asked(trained, capsys):
    before = snapshot(trained)
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--steps", "2", "--out", str(trained))
    assert_one_line_error(code, err, "already holds a run; pass --resume")
    assert snapshot(trained) == before
    code, out, _ = run_cli(capsys, "train", *TINY_VEC, "--steps", "2", "--eval-every", "2",
                           "--out", str(trained), "--overwrite")  # fmt: skip
    assert code == 0 and torch.load(trained / "last.pt", weights_only=True)["step"] == 2


def test_a_locked_run_folder_refuses_a_second_writer(trained, capsys):
    holder = RunFolder(trained)
    holder.lock()
    try:
        before = snapshot(trained)
        code, _, err = run_cli(capsys, "train", *TINY_VEC, "--steps", "6", "--out",
                               str(trained), "--resume")  # fmt: skip
        assert_one_line_error(code, err, "is in use by resflow process")
        assert snapshot(trained) == before
        with pytest.raises(RunLockedError):
            RunFolder(trained).lock()
    finally:
        holder.unlock()


def test_temporary_files_of_a_killed_write_are_removed(trained, capsys):
    stale = trained / "last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, _, _ = run_cli(capsys, "train", *TINY_VEC, "--steps", "6", "--out", str(trained),
                         "--resume")  # fmt: skip
    assert code == 0 and not stale.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "0.5"], "was trained with lr=0.01 (now 0.5)"),
        (["--n-train", "256"], "was trained on other data (8gaussians, n_train=128 (now 256))"),
        (["--set", "n_blocks=2"], "was trained with a different model config"),
    ],
)
def test_resume_refuses_changed_settings(trained, capsys, extra, message):
    before = snapshot(trained)
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--steps", "6", "--out", str(trained),
                           "--resume", *extra)  # fmt: skip
    assert_one_line_error(code, err, message)
    assert snapshot(trained) == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--out", str(tmp_path / "new"),
                           "--resume")  # fmt: skip
    assert_one_line_error(code, err, "nothing to resume")
    assert not (tmp_path / "new" / "config.yaml").exists()


def test_resume_may_extend_the_run_and_says_so(trained, capsys):
    code, out, _ = run_cli(capsys, "train", *TINY_VEC, "--steps", "6", "--out", str(trained),
                           "--resume")  # fmt: skip
    assert code == 0 and "resuming" in out
    assert torch.load(trained / "last.pt", weights_only=True)["step"] == 6
    steps = [eval(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()]  # noqa: S307
    assert steps == sorted(set(steps))  # one record per logged step, nothing repeated


def test_a_diverged_run_keeps_its_last_finite_checkpoint(tmp_path):
    data = DataConfig(name="8gaussians", n_train=128, n_test=64)
    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    train = TrainConfig(steps=10, batch_size=32, checkpoint_every=2, eval_every=100,
                        tensorboard=False, progress=False)  # fmt: skip
    trainer = Trainer(cfg, data, train, tmp_path)
    trainer.objective = NanAfter(trainer.model, 5)
    with pytest.raises(FloatingPointError, match=r"last.pt holds the last finite state \(step 4\)"):
        trainer.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    fresh = Trainer(cfg, data, train, tmp_path / "fresh")
    fresh.objective = NanAfter(fresh.model, 0)
    with pytest.raises(FloatingPointError, match="no checkpoint was written yet"):
        fresh.fit()
    assert not (tmp_path / "fresh" / "last.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    train = TrainConfig(steps=2, batch_size=32, tensorboard=False, progress=False)
    trainer = Trainer(cfg, DataConfig(name="8gaussians", n_train=64, n_test=32), train, tmp_path)
    trainer.fit(until=1)
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(math.nan)
    with pytest.raises(FloatingPointError, match="weights became non-finite"):
        trainer._save(trainer.run.last)
    assert not trainer.run.last.exists()


# ---- silent wrong results ---------------------------------------------------------------
def test_eval_of_a_broken_model_is_an_error_not_nan(trained, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(trained, run)
    state = torch.load(run / "best.pt", weights_only=True)
    for k, v in state["ema"]["shadow"].items():
        state["ema"]["shadow"][k] = torch.full_like(v, math.nan)
    save_checkpoint(state, run / "best.pt")  # with the checksum of these weights
    code, out, err = run_cli(capsys, "eval", "--run", str(run), "--no-progress")
    assert_one_line_error(code, err, "non-finite weights")
    assert "nan" not in out


def test_a_changed_data_file_is_not_scored_silently(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(300, 2)))
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "train", "--data", "x.npy", "--set", "n_blocks=1", "--set",
                           "hidden=[8]", "--steps", "2", "--batch-size", "32", "--no-progress",
                           "--no-tensorboard")  # fmt: skip
    assert code == 0 and (tmp_path / "runs" / "x-toy2d" / "last.pt").exists()
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(300, 2)))
    code, _, err = run_cli(capsys, "eval", "--run", "runs/x-toy2d", "--no-progress")
    assert_one_line_error(code, err, "has changed since")


def test_a_data_path_outside_never_puts_the_run_outside_runs(tmp_path, capsys, monkeypatch):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    np.save(tmp_path / "y.npy", np.random.default_rng(0).normal(size=(100, 2)))
    monkeypatch.chdir(tmp_path / "deep" / "er")
    code, _, _ = run_cli(capsys, "train", "--data", "../../y.npy", "--set", "n_blocks=1",
                         "--set", "hidden=[8]", "--steps", "1", "--batch-size", "32",
                         "--no-progress", "--no-tensorboard")  # fmt: skip
    assert code == 0
    assert (tmp_path / "deep" / "er" / "runs" / "y-toy2d" / "config.yaml").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "values, message",
    [
        (torch.full((2, 1, 8, 8), 2.5), "non-integer values"),
        (torch.full((2, 1, 8, 8), 17.0), r"integer levels in [0, 16]"),
    ],
)
def test_image_models_refuse_values_that_are_not_levels(values, message):
    model = build_model(get_preset("digits-small", n_blocks=(1, 1), hidden=8, fc_blocks=1,
                                   fc_hidden=(8,)))  # fmt: skip
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model.log_prob(values)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m.log_prob(np.zeros((2, 2))), TypeError, "expected a torch.Tensor"),
        (lambda m: m.log_prob(torch.zeros(2, 2, dtype=torch.complex64)), TypeError, "real data"),
        (lambda m: m.log_prob(torch.zeros(2, 2, dtype=torch.float64)), TypeError,
         "the data are torch.float64 but the model is torch.float32"),
        (lambda m: m.log_prob(torch.zeros(0, 2)), ValueError, "empty batch"),
        (lambda m: m.log_prob(torch.zeros(2, 3)), ValueError, r"expected data of shape \[B, 2\]"),
        (lambda m: m.sample(0), ValueError, "number of samples must be >= 1"),
        (lambda m: m.sample(2, temperature=-0.5), ValueError, "temperature must be >= 0"),
    ],
)  # fmt: skip
def test_python_api_refuses_bad_input(call, error, message):
    model = build_model(get_preset("toy2d", n_blocks=1, hidden=(8,)))
    with pytest.raises(error, match=message):
        call(model)


# ---- tracebacks turned into messages ----------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "coeff=1"], "coeff: must be < 1, got 1"),
        (["--set", "coeff=.inf"], "coeff: must be < 1, got inf"),
        (["--set", "n_blocks=100000"], "n_blocks: must be <= 4096, got 100000"),
        (["--set", "hidden=[60000,60000]"], "weights, more than the 1,000,000,000"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--eval-batch-size", "0"], "--eval-batch-size: must be >= 1, got 0"),
        (["--device", "tpu9"], "unknown --device 'tpu9'"),
        (["--n-test", "0"], "--n-test: must be >= 1, got 0"),
        (["--steps", "1", "--batch-size", "4096"], "fewer than the batch size (--batch-size 4096)"),
    ],
)
def test_training_option_errors(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--out", str(out), *args)
    assert_one_line_error(code, err, message)
    assert snapshot(out) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--out", str(tmp_path / "r"),
                           "--device", "cuda")  # fmt: skip
    assert_one_line_error(code, err, "--device cuda: CUDA is not available")


def test_download_without_network(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    code, _, err = run_cli(capsys, "train", "--data", "mnist", "--data-dir", str(tmp_path),
                           "--download", "--out", str(tmp_path / "r"))  # fmt: skip
    assert_one_line_error(code, err, "failed to download")
    assert not list(tmp_path.rglob("*.part"))


def test_sample_to_a_path_under_a_file(trained, tmp_path, capsys):
    img_run = FIXTURES / "img"
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "sample", "--run", str(img_run), "--out",
                           str(tmp_path / "afile" / "s.png"))  # fmt: skip
    assert_one_line_error(code, err, "afile")


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--n", "0"], "must be >= 1, got 0"),
        (["interpolate", "--pairs", "1000"], "needs 2000 test images; there are 297"),
        (["eval", "--set", "coeff=2"], "coeff: must be < 1, got 2"),
        (["eval", "--set", "hidden=16"], "do not fit the model with hidden=16"),
        (["sample", "--which", "nope.pt"], "no checkpoint nope.pt"),
    ],
)
def test_run_command_errors(capsys, tmp_path, args, message):
    run = tmp_path / "img"
    shutil.copytree(FIXTURES / "img", run)
    before = snapshot(run)
    code, _, err = run_cli(capsys, *args, "--run", str(run), *(["--out", str(tmp_path / "o.png")]
                           if args[0] in ("sample", "interpolate") else []))  # fmt: skip
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    assert snapshot(run) == before


def test_damaged_run_records(tmp_path, capsys):
    run = tmp_path / "vec"
    shutil.copytree(FIXTURES / "vec", run)
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:500])
    code, _, err = run_cli(capsys, "eval", "--run", str(run))
    assert_one_line_error(code, err, "corrupt or truncated")
    shutil.copytree(FIXTURES / "vec", tmp_path / "vec2")
    (tmp_path / "vec2" / "data.yaml").write_text("data: [unclosed\n")
    code, _, err = run_cli(capsys, "eval", "--run", str(tmp_path / "vec2"))
    assert code == 2 and "Traceback" not in err


def test_crafted_checkpoint_with_an_absurd_size_is_refused_fast(tmp_path, capsys):
    run = tmp_path / "vec"
    shutil.copytree(FIXTURES / "vec", run)
    state = torch.load(run / "best.pt", weights_only=True)
    state["model_config"]["n_blocks"] = 10**9
    torch.save(state, run / "best.pt")
    code, _, err = run_cli(capsys, "eval", "--run", str(run))
    assert_one_line_error(code, err, "n_blocks: must be <= 4096")
    state["model_config"]["n_blocks"] = 2
    del state["model"]["layers.layers.1.g.1.weight"]
    torch.save(state, run / "best.pt")
    code, _, err = run_cli(capsys, "eval", "--run", str(run))
    assert_one_line_error(code, err, "does not fit its model config")


def test_trainer_refuses_to_overwrite_from_python_too(trained):
    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    with pytest.raises(RunExistsError, match="already holds a run"):
        Trainer(cfg, DataConfig(name="8gaussians"), TrainConfig(), trained)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        RunFolder(trained / "nothing").load_model()


# ---- the certificate --------------------------------------------------------------------
def test_check_passes_on_a_trained_model(trained, capsys):
    code, out, _ = run_cli(capsys, "check", "--run", str(trained))
    assert code == 0 and "certificate: PASSED" in out
    assert "exact (SVD)" in out and "log-density estimate - exact" in out


def _fooled_run(trained, tmp_path):
    """A run whose stored power-iteration vector is orthogonal to the top singular
    vector: the estimate stays at the second singular value, so a layer scaled by the
    estimate alone would be 40x too large."""
    run = tmp_path / "fooled"
    shutil.copytree(trained, run)
    state = torch.load(run / "best.pt", weights_only=True)
    key = "layers.layers.1.g.1"
    w = torch.zeros(8, 2)  # Linear(2 -> 8): singular values 40 (input e1) and 1 (input e2)
    w[0, 0], w[1, 1] = 40.0, 1.0
    state["model"][f"{key}.weight"] = w
    state["ema"]["shadow"][f"{key}.weight"] = w
    state["model"][f"{key}.v"] = torch.tensor([[0.0, 1.0]])  # W^T W v = v: estimate 1
    save_checkpoint(state, run / "best.pt")  # with the checksum of these weights
    return run


def test_a_fooled_norm_estimate_is_corrected_when_the_model_is_loaded(trained, tmp_path, capsys):
    from resflow.layers import LipschitzLinear
    from resflow.runs import load_model

    run = _fooled_run(trained, tmp_path)
    code, out, _ = run_cli(capsys, "check", "--run", str(run))
    assert code == 0 and "certificate: PASSED" in out
    model = load_model(run)
    for m in model.modules():
        if isinstance(m, LipschitzLinear):
            true = torch.linalg.matrix_norm(m.constrained_weight().detach().double(), 2)
            assert float(true) <= m.coeff * (1 + 1e-4)


def test_check_fails_when_the_bound_is_not_certified(trained, tmp_path, capsys, monkeypatch):
    """With certification switched off (the power iteration alone, as resflow 0.1 and
    the authors' code scale weights), the fooled layer is expansive and `check`, which
    computes the exact norms, fails."""
    from resflow.layers.residual.spectral import LipschitzLayer

    run = _fooled_run(trained, tmp_path)
    monkeypatch.setattr(LipschitzLayer, "certify", lambda self, *a, **k: self.refresh())
    code, out, _ = run_cli(capsys, "check", "--run", str(run))
    assert code == 1 and "certificate: FAILED" in out
    assert "FAIL layers.layers.1" in out


def _fool_first_linear(state: dict) -> None:
    """Make both weights of the first fully connected branch expansive in a way the
    power-iteration estimates cannot see (see :func:`_fooled_run`)."""
    key = next(k for k, v in state["model"].items() if k.endswith("g.1.weight") and v.dim() == 2)
    for k in (key, key.replace("g.1.", "g.3.")):
        w = torch.zeros_like(state["model"][k])
        w[0, 0], w[1, 1] = 40.0, 1.0
        state["model"][k] = w
        state["ema"]["shadow"][k] = w
        v = torch.zeros(1, w.shape[1])
        v[0, 1] = 1.0
        state["model"][k.replace("weight", "v")] = v


def _fooled_image_run(tmp_path):
    run = tmp_path / "img"
    shutil.copytree(FIXTURES / "img", run)
    state = torch.load(run / "best.pt", weights_only=True)
    _fool_first_linear(state)
    torch.save(state, run / "best.pt")
    return run


def test_sampling_a_non_invertible_model_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from resflow.layers.residual.spectral import LipschitzLayer

    monkeypatch.setattr(LipschitzLayer, "certify", lambda self, *a, **k: self.refresh())
    run = _fooled_image_run(tmp_path)
    out = tmp_path / "s.png"
    code, _, err = run_cli(capsys, "sample", "--run", str(run), "--n", "16", "--seed", "1",
                           "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "inverse")
    assert not out.exists()
    code, stdout, _ = run_cli(capsys, "check", "--run", str(run), "--n", "16")
    assert code == 1 and "certificate: FAILED" in stdout


def test_the_same_model_samples_once_its_bounds_are_certified(tmp_path, capsys):
    run = _fooled_image_run(tmp_path)
    out = tmp_path / "s.png"
    code, stdout, _ = run_cli(capsys, "sample", "--run", str(run), "--n", "16", "--seed", "1",
                              "--out", str(out), "--check")  # fmt: skip
    assert code == 0 and out.exists() and "worst round-trip error" in stdout


def test_an_image_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    from PIL import Image

    from resflow.evaluation import save_image_grid

    path = tmp_path / "grid.png"
    save_image_grid(torch.zeros(4, 1, 8, 8), path, 17)
    before = path.read_bytes()

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_image_grid(torch.ones(4, 1, 8, 8), path, 17)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_data_problems_are_found_before_the_first_step(tmp_path):
    from resflow.data import DataSplit

    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    train = TrainConfig(steps=2, batch_size=8, tensorboard=False, progress=False)
    odd = DataSplit(torch.randn(64, 2), torch.randn(16, 3), "odd")
    with pytest.raises(ValueError, match=r"test examples \(3,\)"):
        Trainer(cfg, odd, train, tmp_path / "a")
    empty = DataSplit(torch.randn(64, 2), torch.randn(0, 2), "empty")
    with pytest.raises(ValueError, match="the test set is empty"):
        Trainer(cfg, empty, train, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- every command checks what it is given (issue 32, part A) ---------------------------
IMAGE_PRESETS = ["digits-small", "iresnet-digits", "glow-digits", "realnvp-digits",
                 "flowpp-digits", "denseflow-digits", "hybrid-digits",
                 "tarflow-digits"]  # fmt: skip
VECTOR_PRESETS = ["toy2d", "iresnet-toy2d", "glow-toy2d", "realnvp-toy2d", "maf-toy2d",
                  "naf-toy2d"]  # fmt: skip


def _made_run(folder: Path, preset: str, nan: bool = False) -> Path:
    """A run folder of ``preset`` with untrained weights (a config.yaml and a best.pt, as
    `resflow train` writes them); ``nan``: its first weight tensor is NaN."""
    from resflow.checkpoint import save_checkpoint
    from resflow.data import load_data
    from resflow.models import MODELS, PRESETS, config_to_dict
    from resflow.runs import RunConfig

    p = PRESETS.get(preset)
    data_cfg = (DataConfig(name="digits") if preset in IMAGE_PRESETS
                else DataConfig(name="8gaussians", n_train=64, n_test=32))  # fmt: skip
    data = load_data(data_cfg)
    cfg = MODELS.get(p.model).adapt(p.config, data.shape, data.levels)
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if nan:
        first = next(n for n, _ in model.named_parameters())
        state[first].fill_(math.nan)
    folder.mkdir(parents=True)
    RunFolder(folder).write_config(RunConfig(cfg, data_cfg, TrainConfig()))
    save_checkpoint({"model": state, "model_config": config_to_dict(cfg), "step": 0},
                    folder / "best.pt")  # fmt: skip
    return folder


def _command_args(command: str, run: Path, out: Path, image: bool) -> list[str]:
    args = [command, "--run", str(run)]
    if command == "sample":
        args += ["--n", "4", "--out", str(out / ("s.png" if image else "s.npy"))]
    elif command in ("interpolate", "compress"):
        args += ["--out", str(out / f"{command}.png")]
    elif command == "score":
        args += ["--input", "digits" if image else str(out.parent / "x.npy"), "--max", "4",
                 "--out", str(out / "scores.csv"), "--no-progress"]  # fmt: skip
        if not image:
            np.save(out.parent / "x.npy", np.zeros((4, 2)))
    elif command == "eval":
        args += ["--no-progress", "--max", "8"]
    elif command == "check":
        args += ["--n", "4"]
    return args


RUN_COMMANDS = ["eval", "score", "sample", "interpolate", "compress", "check"]


@pytest.mark.parametrize("preset", IMAGE_PRESETS + VECTOR_PRESETS)
def test_a_model_with_non_finite_weights_is_refused_by_every_command(tmp_path, capsys, preset):
    """Every command refuses it in one line (exit 2), before any output; `check` reports
    it as a failed certificate (exit 1), whatever the family."""
    run = _made_run(tmp_path / "run", preset, nan=True)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(run)
    image = preset in IMAGE_PRESETS
    for command in RUN_COMMANDS:
        listing = snapshot(out)
        code, stdout, err = run_cli(capsys, *_command_args(command, run, out, image))
        if command == "check":
            assert code == 1, err
            assert "FAIL weights: 1 tensor(s) hold NaN or inf" in stdout
            assert "certificate: FAILED" in stdout and "Traceback" not in err
        else:
            assert_one_line_error(code, err, "the model has non-finite weights")
        assert snapshot(out) == listing, command
        assert snapshot(run) == before


@pytest.mark.parametrize("preset", ["glow-digits", "digits-small", "tarflow-digits", "maf-toy2d",
                                    "toy2d"])  # fmt: skip
def test_a_finite_model_of_every_kind_still_passes_the_shared_checks(tmp_path, capsys, preset):
    run = _made_run(tmp_path / "run", preset)
    out = tmp_path / "out"
    out.mkdir()
    image = preset in IMAGE_PRESETS
    code, stdout, err = run_cli(capsys, *_command_args("sample", run, out, image))
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *_command_args("eval", run, out, image))
    assert code == 0 and "test" in stdout, err


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_a_run_record_copied_from_another_run_is_refused(trained, tmp_path, capsys, command):
    """config.yaml of an image run beside a 2-D model's checkpoint (sample used to end in
    an IndexError from the scatter plot, eval in a shape error)."""
    run = tmp_path / "mixed"
    shutil.copytree(trained, run)
    shutil.copy(FIXTURES / "img" / "config.yaml", run / "config.yaml")
    (run / "data.yaml").unlink(missing_ok=True)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(run)
    code, _, err = run_cli(capsys, *_command_args(command, run, out, False))
    assert_one_line_error(code, err, "is the record copied from another run?")
    assert snapshot(run) == before
    assert snapshot(out) == {}


def test_a_run_record_with_data_of_another_shape_is_refused(trained, tmp_path, capsys):
    """The model config matches, but the recorded data are 3-D: no command mixes them."""
    import yaml

    run = tmp_path / "mixed"
    shutil.copytree(trained, run)
    np.save(tmp_path / "x3.npy", np.random.default_rng(0).normal(size=(300, 3)))
    doc = yaml.safe_load((run / "config.yaml").read_text())
    doc["data"]["name"] = str(tmp_path / "x3.npy")
    doc.pop("data_sha256", None)
    (run / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    before = snapshot(run)
    for command in ("eval", "sample", "check"):
        code, _, err = run_cli(capsys, *_command_args(command, run, tmp_path, False))
        assert_one_line_error(code, err, "do not fit its model (2,)")
    assert snapshot(run) == before and not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--temperature", "inf"], "--temperature must be >= 0 and finite, got inf"),
        (["sample", "--temperature", "nan"], "--temperature must be >= 0 and finite, got nan"),
        (["sample", "--guidance", "inf"], "--guidance must be finite, got inf"),
        (["compress", "--temperature", "inf"], "--temperature must be >= 0 and finite"),
        (["fid", "--temperature=-inf"], "--temperature must be >= 0 and finite"),
        (["eval", "--threads", "100000"], "--threads 100000: this machine has"),
        (["check", "--threads", "100000"], "--threads 100000: this machine has"),
        (["score", "--threads", "100000", "--input", "digits"], "--threads 100000"),
        (["sample", "--n", "100000000000"], "needs about"),
        (["interpolate", "--steps", "10000000"], "--steps 10000000 with --pairs 4 needs about"),
        (["interpolate", "--steps", "100000", "--manifold"], "--steps 100000 needs about"),
        (["fid", "--n", "100000000000"], "--n 100000000000 needs about"),
    ],
)
def test_values_no_command_can_use_are_refused_at_once(capsys, tmp_path, args, message):
    run = tmp_path / "img"
    shutil.copytree(FIXTURES / "img", run)
    before = snapshot(run)
    out = (
        ["--out", str(tmp_path / "o.png")]
        if args[0] in ("sample", "interpolate", "compress")
        else []
    )
    if args[0] == "score":
        out = ["--out", str(tmp_path / "o.csv")]
    code, _, err = run_cli(capsys, *args, "--run", str(run), *out)
    assert_one_line_error(code, err, message)
    assert snapshot(run) == before
    assert not list(tmp_path.glob("o.*"))


def test_threads_are_counted_against_the_cores_this_process_may_use(capsys, monkeypatch):
    """In a container or under ``taskset`` the process may use fewer cores than the
    machine has: the limit follows its CPU affinity, not ``os.cpu_count()``."""
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    code, _, err = run_cli(capsys, "eval", "--run", str(FIXTURES / "img"), "--threads", "5")
    assert_one_line_error(code, err, "--threads 5: this machine has 1 core(s); use at most 4")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "inf"], "--temperature must be >= 0 and finite, got inf"),
        (["--n", "100000000000", "--out", "s.npy"], "--n 100000000000 needs about"),
        (["--n", "100000000000", "--out", "s.csv"], "lower --n"),
        (["--threads", "100000"], "--threads 100000"),
    ],
)
def test_vector_sampling_refuses_values_at_once(trained, tmp_path, capsys, monkeypatch, args,
                                                message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    before = snapshot(trained)
    code, _, err = run_cli(capsys, "sample", "--run", str(trained), *args)
    assert_one_line_error(code, err, message)
    assert snapshot(trained) == before and not list(tmp_path.glob("s.*"))


def test_train_and_vi_refuse_thread_counts_at_once(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--out", str(tmp_path / "r"),
                           "--threads", "100000")  # fmt: skip
    assert_one_line_error(code, err, "--threads 100000")
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(capsys, "vi", "--target", "banana", "--out", str(tmp_path / "v"),
                           "--threads", "100000", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "--threads 100000")
    assert not (tmp_path / "v").exists()
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--out", str(tmp_path / "r"),
                           "--temperature", "inf")  # fmt: skip
    assert_one_line_error(code, err, "--temperature must be >= 0 and finite")
    assert not (tmp_path / "r").exists()


def _write_image(path: Path, mode: str) -> None:
    from PIL import Image

    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    elif mode == "F":
        Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path)
    elif mode == "I":
        Image.fromarray(np.full((8, 8), 7, dtype=np.int32)).save(path)
    elif mode == "RGB;16":  # Pillow cannot write it, and opens it as 8-bit "RGB"
        path.write_bytes(_png_rgb16(np.full((8, 8, 3), 40000, dtype=">u2")))


def _png_rgb16(pixels: np.ndarray) -> bytes:
    """A PNG of 16 bits per channel (colour type 2), written by hand."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[i].tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize(
    "name, mode, message",
    [
        ("a.png", "I;16", "a 16-bit image; resflow reads 8-bit images"),
        ("a.png", "RGB;16", "a 16-bit image; resflow reads 8-bit images"),
        ("a.tiff", "F", "a 32-bit (F) image"),
        ("a.tiff", "I", "a 32-bit (I) image"),
    ],
)
def test_score_refuses_images_that_are_not_8_bit(tmp_path, capsys, name, mode, message):
    """A 16-bit PNG used to be read as an all-white image and scored."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    _write_image(folder / name, mode)
    out = tmp_path / "scores.csv"
    code, _, err = run_cli(capsys, "score", "--run", str(FIXTURES / "img"), "--input",
                           str(folder), "--out", str(out), "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, message)
    assert not out.exists()


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: np.save(p.with_suffix(".npy"), np.array([[0.0, np.nan], [1.0, 2.0]])),
         "1 value(s) are NaN or infinite (first in row 0)"),
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros((2, 2), dtype=complex)),
         "expected real numbers, got complex128"),
        (lambda p: p.with_suffix(".csv").write_text("x,y\n1,2\ninf,3\n"),
         "1 value(s) are NaN or infinite (first in row 1)"),
        (lambda p: p.with_suffix(".npy").write_text("garbage"), "not a NumPy array file"),
        (lambda p: p.with_suffix(".csv").write_text("x,y\n1,2\n3\n"),
         "not a matrix of numbers (the number of columns changed from 2 to 1"),
    ],
)  # fmt: skip
def test_score_refuses_vectors_a_density_cannot_score(trained, tmp_path, capsys, write, message):
    write(tmp_path / "x")
    path = next(tmp_path.glob("x.*"))
    out = tmp_path / "scores.csv"
    code, _, err = run_cli(capsys, "score", "--run", str(trained), "--input", str(path),
                           "--out", str(out), "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, message)
    assert not out.exists()


@pytest.mark.parametrize("preset", ["glow-digits", "realnvp-toy2d", "toy2d"])
def test_the_api_refuses_an_infinite_temperature(preset):
    """Coupling image models used to return non-finite samples (and the CLI a grid)."""
    model = build_model(get_preset(preset))
    for t in (math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
            model.sample(2, temperature=t)


# ---- hangs and traps --------------------------------------------------------------------
def test_the_default_vector_preset_picks_its_training_estimator_by_dimension():
    """On 1000-D data the default preset (toy2d, adapted) trains with the series, not a
    1000-column Jacobian in every block (about 28 s a step on 2 cores); on 2-D data it
    stays exact."""
    from resflow.layers.residual.block import ResidualBlock
    from resflow.models import MODELS, PRESETS

    preset = PRESETS.get("toy2d")
    for dim, method in ((2, "exact"), (16, "exact"), (17, "series"), (1000, "series")):
        cfg = MODELS.get(preset.model).adapt(replace_hidden(preset.config), (dim,), None)
        model = build_model(cfg).train()
        block = next(m for m in model.modules() if isinstance(m, ResidualBlock))
        assert block.estimator_for(torch.zeros(1, dim)).method == method
        model.eval()
        assert block.estimator_for(torch.zeros(1, dim)).method == method


def replace_hidden(cfg):
    from resflow.config import replace

    return replace(cfg, n_blocks=1, hidden=(8,))


def test_the_2d_presets_train_bit_identically_with_the_estimator_chosen_by_dimension(tmp_path):
    from resflow.config import replace
    from resflow.models.residual_flow import EstimatorConfig

    states = []
    for est in (None, EstimatorConfig(train_method="exact", eval_method="exact")):
        cfg = get_preset("toy2d", n_blocks=2, hidden=(16,))
        cfg = cfg if est is None else replace(cfg, estimator=est)
        train = TrainConfig(steps=4, batch_size=64, eval_every=4, tensorboard=False,
                            progress=False)  # fmt: skip
        data = DataConfig(name="8gaussians", n_train=256, n_test=64)
        trainer = Trainer(cfg, data, train, tmp_path / str(len(states)))
        final = trainer.fit().final
        states.append((trainer.model.state_dict(), final.mean))
    (a, ma), (b, mb) = states
    assert ma == mb and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--anneal", "-5"], "--anneal must be >= 0, got -5"),
        (["--batch-size", "100000000000"], "--batch-size 100000000000 needs about"),
        (["--n-eval", "100000000000"], "--n-eval 100000000000 needs about"),
        (["--threads", "100000"], "--threads 100000"),
    ],
)
def test_vi_refuses_values_before_any_fitting(tmp_path, capsys, args, message):
    out = tmp_path / "fit"
    code, stdout, err = run_cli(capsys, "vi", "--target", "banana", "--steps", "2",
                                "--no-progress", "--out", str(out), *args)  # fmt: skip
    assert_one_line_error(code, err, message)
    assert "fitting" not in stdout and not out.exists()


def test_score_refuses_a_repeat_count_beyond_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("resflow.cli.checks.available_memory", lambda: 10_000)
    out = tmp_path / "scores.csv"
    code, _, err = run_cli(capsys, "score", "--run", str(FIXTURES / "img"), "--input", "digits",
                           "--repeats", "100", "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "--repeats 100 needs about")
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["score", "--input", "digits", "--repeats", "10000000000"], "--repeats 10000000000: at"),
        (["score", "--input", "digits", "--hutchinson", "1000000000"], "--hutchinson 1000000000"),
        (["eval", "--iw-samples", "100000"], "--iw-samples 100000: at most 10,000"),
    ],
)
def test_draw_counts_that_could_never_finish_are_refused(tmp_path, capsys, args, message):
    """`score --hutchinson 1e9` used to run for ever (a loop of a billion passes)."""
    out = tmp_path / "scores.csv"
    extra = ["--out", str(out)] if args[0] == "score" else []
    code, _, err = run_cli(capsys, *args, "--run", str(FIXTURES / "img"), *extra)
    assert_one_line_error(code, err, message)
    assert not out.exists()


def test_an_allocation_torch_refuses_is_one_line(capsys, monkeypatch):
    """torch's CPU allocator reports a size it cannot allocate as a RuntimeError."""

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 64000000000 bytes. "
                           "Error code 12 (Cannot allocate memory)")  # fmt: skip

    monkeypatch.setattr("resflow.cli.measure.evaluate_bounds", refuse)
    code, _, err = run_cli(capsys, "eval", "--run", str(FIXTURES / "img"), "--iw-samples",
                           "16", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "out of memory: an allocation of 59.6 GiB failed")


@pytest.mark.parametrize("command", ["eval", "check", "interpolate", "compress"])
def test_run_data_of_other_levels_are_refused(tmp_path, capsys, monkeypatch, command):
    """Data read with another bit depth than the model's (e.g. n_bits changed in the
    record): no command scores or draws them as if they fitted."""
    from resflow.data import DataSplit

    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    other = DataSplit(images, images, "other", 256)
    monkeypatch.setattr(RunFolder, "load_data", lambda self, data_dir=None: other)
    run = tmp_path / "img"
    shutil.copytree(FIXTURES / "img", run)
    before = snapshot(run)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(capsys, *_command_args(command, run, out, True))
    assert_one_line_error(code, err, "have 256 levels, its model 17")
    assert snapshot(run) == before and snapshot(out) == {}


@pytest.mark.parametrize("extra", [[], ["--manifold"]])
def test_interpolate_needs_two_steps(tmp_path, capsys, extra):
    run = tmp_path / "img"
    shutil.copytree(FIXTURES / "img", run)
    out = tmp_path / "i.png"
    code, _, err = run_cli(capsys, "interpolate", "--run", str(run), "--steps", "1",
                           "--out", str(out), *extra)  # fmt: skip
    assert_one_line_error(code, err, "--steps must be >= 2 (the two ends), got 1")
    assert not out.exists()
    from resflow.evaluation import interpolate

    model = RunFolder(run).load_model()
    x = RunFolder(run).load_data().test[:2]
    with pytest.raises(ValueError, match="steps must be >= 2"):
        interpolate(model, x[0], x[1], 1)


def test_training_on_a_folder_of_16_bit_images_is_refused(tmp_path, capsys):
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
        _write_image(folder / f"{i}.png", "I;16")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "folder", "--path", str(tmp_path / "imgs"),
                           "--preset", "glow-digits", "--steps", "1", "--out", str(out),
                           "--no-progress", "--no-tensorboard")  # fmt: skip
    assert_one_line_error(code, err, "a 16-bit image; resflow reads 8-bit images")
    assert not out.exists()
