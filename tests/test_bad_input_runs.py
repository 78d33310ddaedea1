"""Runs and their files under careless use: no command replaces earlier results unless
asked, a run stopped before its first checkpoint restarts with one clear instruction,
and a damaged, edited or too new checkpoint is refused in one line. Each case checks
the message, the exit code and that nothing on disk changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from resflow.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from resflow.cli import main
from resflow.runs import RunFolder
from test_bad_input import FIXTURES, TINY_VEC, assert_one_line_error, run_cli, snapshot


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small finished 2-D run (copied by the tests that change it)."""
    run = tmp_path_factory.mktemp("runs") / "vec"
    assert main(["train", *TINY_VEC, "--steps", "4", "--eval-every", "4", "--out", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    run = tmp_path / "vec"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns(".lock"))
    return run


# ---- checkpoints: checksum and format ---------------------------------------------------
def test_checkpoints_record_the_checksum_of_their_weights(trained):
    state = load_checkpoint(trained / "best.pt")
    assert state["format"] == FORMAT and len(state["checksum"]) == 64


def test_edited_weights_are_refused(run_copy, capsys):
    state = torch.load(run_copy / "best.pt", weights_only=True)
    name = next(iter(state["ema"]["shadow"]))
    state["ema"]["shadow"][name] = state["ema"]["shadow"][name] + 1e-3
    torch.save(state, run_copy / "best.pt")  # edited, not re-signed
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, "eval", "--run", str(run_copy), "--no-progress")
    assert_one_line_error(code, err, "is damaged or was edited: the checksum of its weights")
    assert snapshot(run_copy) == before


def test_a_damaged_weight_byte_is_refused(run_copy, capsys):
    state = torch.load(run_copy / "last.pt", weights_only=True)
    name, w = next((k, v) for k, v in state["model"].items() if v.numel() >= 8)
    raw = bytearray((run_copy / "last.pt").read_bytes())
    needle = w.contiguous().numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0, name
    raw[at + 1] ^= 0x40  # one flipped bit inside the weights
    (run_copy / "last.pt").write_bytes(bytes(raw))
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, "eval", "--run", str(run_copy), "--which", "last",
                           "--no-progress")  # fmt: skip
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "damaged or was edited" in err or "corrupt or truncated" in err, err
    assert snapshot(run_copy) == before


def test_resume_from_an_edited_checkpoint_is_refused(run_copy, capsys):
    state = torch.load(run_copy / "last.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros_like(state["model"][name])
    torch.save(state, run_copy / "last.pt")
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--steps", "6", "--out", str(run_copy),
                           "--resume")  # fmt: skip
    assert_one_line_error(code, err, "is damaged or was edited")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_a_checkpoint_of_a_newer_format_is_refused(run_copy, capsys, command):
    state = torch.load(run_copy / "best.pt", weights_only=True)
    state["format"] = FORMAT + 1
    save_checkpoint(state, run_copy / "best.pt")
    before = snapshot(run_copy)
    extra = ["--out", str(run_copy / "s.npy")] if command == "sample" else ["--no-progress"]
    code, _, err = run_cli(capsys, command, "--run", str(run_copy), *extra)
    assert_one_line_error(code, err, f"newer resflow (checkpoint format {FORMAT + 1}")
    assert snapshot(run_copy) == before


def test_resume_from_a_checkpoint_of_a_newer_format_is_refused(run_copy, capsys):
    state = torch.load(run_copy / "last.pt", weights_only=True)
    state["format"] = FORMAT + 5
    save_checkpoint(state, run_copy / "last.pt")
    before = snapshot(run_copy)
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--steps", "6", "--out", str(run_copy),
                           "--resume")  # fmt: skip
    assert_one_line_error(code, err, f"this version reads formats up to {FORMAT}): upgrade")
    assert snapshot(run_copy) == before


def test_a_checkpoint_with_a_nonsense_format_is_refused(run_copy):
    state = torch.load(run_copy / "best.pt", weights_only=True)
    state["format"] = "two"
    save_checkpoint(state, run_copy / "best.pt")
    with pytest.raises(CheckpointError, match="not a resflow checkpoint"):
        RunFolder(run_copy).load_model()


def test_old_checkpoints_without_a_checksum_still_load(tmp_path):
    for name in ("vec", "img"):
        state = load_checkpoint(FIXTURES / name / "best.pt")
        assert "checksum" not in state
        RunFolder(FIXTURES / name).load_model()


def test_resaving_a_loaded_checkpoint_keeps_it_valid(run_copy):
    state = load_checkpoint(run_copy / "last.pt")
    save_checkpoint(state, run_copy / "again.pt")
    assert load_checkpoint(run_copy / "again.pt")["checksum"] == state["checksum"]


# ---- a run stopped before its first checkpoint ------------------------------------------
STEPS = ["--steps", "4", "--eval-every", "4"]


@pytest.fixture
def stopped_early(tmp_path, capsys, monkeypatch) -> Path:
    """A run interrupted (Ctrl-C) before it wrote its first checkpoint: a config.yaml
    and a TensorBoard folder, no last.pt."""
    from resflow.training import Trainer

    def interrupted(self, *a, **k):  # type: ignore[no-untyped-def]
        (self.out / "tb").mkdir(exist_ok=True)
        (self.out / "tb" / "events.out").write_text("partial")
        raise KeyboardInterrupt

    run = tmp_path / "early"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", interrupted)
        code, _, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--out", str(run))
    assert code == 130 and "resume with --resume (from last.pt, or from step 0 if no" in err
    assert (run / "config.yaml").exists() and not (run / "last.pt").exists()
    return run


def test_an_interrupted_command_that_is_not_train_does_not_advise_resume(
    tmp_path, capsys, monkeypatch
):
    import resflow.cli.draw

    def interrupted(*a, **k):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(resflow.cli.draw, "save_image_grid", interrupted)
    out = _write(tmp_path / "s.png")
    code, _, err = run_cli(capsys, "sample", "--run", str(FIXTURES / "img"), "--n", "2", "--out",
                           str(out), "--overwrite")  # fmt: skip
    assert code == 130 and "interrupted; no file is left half-written" in err
    assert "--resume" not in err and out.read_text() == "earlier result"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag", [[], ["--resume"]])
def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_place(
    stopped_early, trained, capsys, flag
):
    code, out, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--out", str(stopped_early),
                             *flag)  # fmt: skip
    assert code == 0, err
    assert "was stopped before its first checkpoint; starting it again" in out
    assert not (stopped_early / "tb" / "events.out").exists()  # the stopped attempt's log
    assert load_checkpoint(stopped_early / "last.pt")["step"] == 4
    assert _same(_weights(stopped_early), _weights(trained))  # as if never stopped


def test_a_run_stopped_before_its_first_checkpoint_keeps_its_settings_unless_asked(
    stopped_early, capsys
):
    before = snapshot(stopped_early)
    code, _, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--lr", "0.05", "--out",
                           str(stopped_early))  # fmt: skip
    assert_one_line_error(code, err, "holds a run stopped before its first checkpoint, with "
                          "other settings (lr=0.01 (now 0.05)); pass --resume")  # fmt: skip
    assert snapshot(stopped_early) == before
    code, _, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--set", "hidden=[4]", "--out",
                           str(stopped_early))  # fmt: skip
    assert_one_line_error(code, err, "with other settings (hidden=")
    assert snapshot(stopped_early) == before
    code, _, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--lr", "0.05", "--resume",
                           "--out", str(stopped_early))  # fmt: skip
    assert_one_line_error(code, err, "--resume: ")
    assert snapshot(stopped_early) == before
    code, _, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--lr", "0.05", "--overwrite",
                           "--out", str(stopped_early))  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(stopped_early / "last.pt")["train_config"]["lr"] == 0.05


@pytest.mark.parametrize("command", ["eval", "sample", "check"])
def test_a_run_stopped_before_its_first_checkpoint_has_no_model_to_use(
    stopped_early, capsys, command
):
    before = snapshot(stopped_early)
    extra = ["--out", str(stopped_early / "s.npy")] if command == "sample" else []
    code, _, err = run_cli(capsys, command, "--run", str(stopped_early), *extra)
    advice = "stopped before its first checkpoint; start it again with `resflow train --resume"
    assert_one_line_error(code, err, f"no checkpoint in {stopped_early} yet: the run was {advice}")
    assert snapshot(stopped_early) == before
    if command == "check":  # the advice works as given
        code, out, err = run_cli(capsys, "train", "--resume", "--out", str(stopped_early))
        assert code == 0 and "starting it again from step 0" in out, err
        assert load_checkpoint(stopped_early / "last.pt")["step"] == 4


def test_the_python_api_resumes_a_run_stopped_before_its_first_checkpoint(tmp_path):
    from resflow import DataConfig, TrainConfig, Trainer, get_preset

    cfg = get_preset("toy2d", n_blocks=1, hidden=(8,))
    data = DataConfig(name="8gaussians", n_train=128, n_test=64)
    train = TrainConfig(steps=2, batch_size=32, progress=False, tensorboard=False)
    Trainer(cfg, data, train, tmp_path / "r")  # writes config.yaml, then "dies"
    trainer = Trainer(cfg, data, train, tmp_path / "r", resume=True)
    assert trainer.restarted and trainer.step == 0
    trainer.fit()
    assert load_checkpoint(tmp_path / "r" / "last.pt")["step"] == 2


# ---- outputs: checked before any work, never replaced unasked ---------------------------
def _write(path: Path, text: str = "earlier result") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


PLOT = ["--out", "x.csv", "--plot", "s.png"]


@pytest.mark.parametrize(
    ("args", "existing", "flag"),
    [
        (["sample", "--run", "img", "--n", "4"], "s.png", "--out"),
        (["sample", "--run", "vec", "--n", "4"], "s.npy", "--out"),
        (["sample", "--run", "vec", "--n", "4", "--out", "s.csv"], "s.png", "--out"),  # scatter
        (["interpolate", "--run", "img", "--pairs", "1", "--steps", "2"], "s.png", "--out"),
        (["compress", "--run", "img", "--n", "1"], "s.png", "--out"),  # (not multi-scale)
        (["score", "--run", "vec", "--input", "8gaussians", "--max", "4"], "s.csv", "--out"),
        (
            ["score", "--run", "vec", "--input", "8gaussians", "--max", "4", *PLOT],
            "s.png",
            "--plot",
        ),
    ],
)
def test_an_existing_output_is_not_replaced_unless_asked(tmp_path, capsys, args, existing, flag):
    args = [str(FIXTURES / a) if a in ("img", "vec") else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / existing)]
    args = [str(tmp_path / a) if a in ("s.csv", "x.csv", "s.png") else a for a in args]
    earlier = _write(tmp_path / existing)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args, "--no-progress" if "score" in args else "--seed=0")
    assert_one_line_error(code, err, f"{flag} {earlier} already exists; pass --overwrite")
    assert out == "" and snapshot(tmp_path) == before
    code, _, err = run_cli(capsys, *args, "--overwrite")
    if "compress" in args:  # past the check: this run cannot be compressed, nothing written
        assert_one_line_error(code, err, "conceptual compression needs a multi-scale latent")
        assert snapshot(tmp_path) == before
        return
    assert code == 0, err
    assert earlier.read_bytes() != b"earlier result"


@pytest.mark.parametrize("command", ["sample", "interpolate", "compress", "score"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, command):
    extra = ["--input", "digits", "--max", "2"] if command == "score" else []
    (tmp_path / "folder.png").mkdir()
    for out, message in [
        (tmp_path / "folder.png", "is a folder; give a file name"),
        (_write(tmp_path / "afile") / "x.png", "afile is a file, not a folder"),
    ]:
        before = snapshot(tmp_path)
        out_flag = "--plot" if command == "score" else "--out"
        code, stdout, err = run_cli(capsys, command, "--run", str(FIXTURES / "img"), *extra,
                                    out_flag, str(out))  # fmt: skip
        assert_one_line_error(code, err, message)
        assert stdout == "" and snapshot(tmp_path) == before


def test_two_outputs_of_one_command_may_not_be_the_same_file(tmp_path, capsys):
    same = str(tmp_path / "s.png")
    code, out, err = run_cli(capsys, "score", "--run", str(FIXTURES / "vec"), "--input",
                             "8gaussians", "--out", same, "--plot", same)  # fmt: skip
    assert_one_line_error(code, err, "--out and --plot name the same file")
    code, out, err = run_cli(capsys, "sample", "--run", str(FIXTURES / "vec"), "--out",
                             same)  # fmt: skip
    assert code == 0, err  # a 2-D run's .png is the scatter itself
    assert list(tmp_path.iterdir()) == [tmp_path / "s.png"]


VI = ["vi", "--target", "two-moons", "--steps", "2", "--batch-size", "16", "--n-eval", "64",
      "--no-progress", "--set", "hidden=[4]"]  # fmt: skip


def test_vi_does_not_replace_an_earlier_fit_unless_asked(tmp_path, capsys):
    out = tmp_path / "fit"
    code, _, err = run_cli(capsys, *VI, "--out", str(out))
    assert code == 0, err
    before = snapshot(out)
    code, stdout, err = run_cli(capsys, *VI, "--seed", "1", "--out", str(out))
    assert_one_line_error(code, err, f"--out {out} already holds a fit (result.json); pass "
                          "--overwrite")  # fmt: skip
    assert "fitting" not in stdout and snapshot(out) == before  # refused before training
    code, _, err = run_cli(capsys, *VI, "--seed", "1", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert snapshot(out) != before


def test_an_overwritten_fit_keeps_no_plot_of_the_earlier_one(tmp_path, capsys):
    out = tmp_path / "fit"
    assert run_cli(capsys, *VI, "--out", str(out))[0] == 0 and (out / "fit.png").exists()
    code, _, err = run_cli(capsys, *VI[:2], "funnel", "--dim", "3", *VI[3:], "--out", str(out),
                           "--overwrite")  # fmt: skip
    assert code == 0, err
    assert not (out / "fit.png").exists() and '"dim": 3' in (out / "result.json").read_text()


def test_vi_into_a_file_is_refused_before_training(tmp_path, capsys):
    afile = _write(tmp_path / "afile")
    for out, message in [(afile, "is a file; give a folder"),
                         (afile / "fit", "afile is a file, not a folder")]:  # fmt: skip
        code, stdout, err = run_cli(capsys, *VI, "--out", str(out))
        assert_one_line_error(code, err, message)
        assert "fitting" not in stdout and afile.read_text() == "earlier result"


def test_an_overwritten_run_keeps_no_file_of_the_earlier_one(run_copy, capsys):
    from resflow.runs import RUN_DIRS, RUN_FILES

    for name in RUN_FILES:  # every file a run may write, e.g. a noisy model's denoised grid
        if not (run_copy / name).exists():
            _write(run_copy / name)
    for name in RUN_DIRS:
        _write(run_copy / name / "old")
    mine = _write(run_copy / "notes.txt", "the user's own file")
    code, _, err = run_cli(capsys, "train", *TINY_VEC, "--steps", "2", "--eval-every", "2",
                           "--out", str(run_copy), "--overwrite")  # fmt: skip
    assert code == 0, err
    left = {p.name for p in run_copy.rglob("*") if p.is_file()}
    assert "samples_denoised.png" not in left and "old" not in left and "data.yaml" not in left
    assert mine.read_text() == "the user's own file"  # only what a run writes is removed


def test_train_into_a_file_is_refused_before_training(tmp_path, capsys):
    afile = _write(tmp_path / "afile")
    for out in (afile, afile / "run"):
        code, stdout, err = run_cli(capsys, "train", *TINY_VEC, *STEPS, "--out", str(out))
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(afile) in err and "training" not in stdout
        assert afile.read_text() == "earlier result"


# ---- sizes and records checked before the data are drawn --------------------------------
def test_resume_with_a_record_copied_from_another_run_is_refused_before_any_work(
    run_copy, capsys, monkeypatch
):
    """``train --resume`` on a folder whose config.yaml belongs to another run: refused
    before the data are loaded, in one line, and the folder is left as it was."""
    import resflow.cli.train as cli

    shutil.copy(FIXTURES / "img" / "config.yaml", run_copy / "config.yaml")
    before = snapshot(run_copy)
    monkeypatch.setattr(cli, "load_data", _no_data)
    code, _, err = run_cli(capsys, "train", "--resume", "--out", str(run_copy), "--steps", "8")
    assert_one_line_error(code, err, "is the record copied from another run?")
    assert snapshot(run_copy) == before


def _no_data(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("the data were loaded before the record was checked")


@pytest.mark.parametrize("flags", [["--n-train", "3000000000"], ["--n-test", "3000000000"]])
def test_toy_data_beyond_memory_are_refused_before_they_are_drawn(tmp_path, capsys, flags):
    """Drawing three billion points used to page for a minute before the allocator
    failed; now the size is refused at once, and no run folder is made."""
    out = tmp_path / "r"
    args = [a for a in TINY_VEC if a not in ("--n-train", "128", "--n-test", "64")]
    code, _, err = run_cli(capsys, "train", *args, *flags, "--out", str(out))
    assert_one_line_error(code, err, "GiB of memory")
    assert "lower --n-train (or --n-test)" in err
    assert not out.exists()
