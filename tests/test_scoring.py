"""``resflow score``: bits/dim per input with its standard error, the same numbers as
``resflow eval`` when each input is drawn once."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from resflow.evaluation import evaluate, per_example
from resflow.runs import RunFolder
from resflow.scoring import (
    DEFAULT_REPEATS,
    ScoreInput,
    Scores,
    auroc,
    load_inputs,
    read_csv,
    score,
    to_levels,
    write_scores,
)
from test_cli import FIXTURES, resflow

RUN = FIXTURES / "img"  # digits, 17 levels, trained by resflow 0.1
VEC = FIXTURES / "vec"  # 2-D vectors, exact logdets: deterministic


def _mean(text: str) -> str:
    return re.search(r"(\d+\.\d+ \+- \d+\.\d+ bits/dim \(n=\d+\))", text).group(1)  # type: ignore[union-attr]


def test_score_gives_the_bits_per_dim_of_eval(tmp_path):
    test = RunFolder(RUN).load_data().test[:50]
    np.save(tmp_path / "test.npy", test.numpy())
    out = tmp_path / "scores.csv"
    printed = resflow("score", "--run", str(RUN), "--input", str(tmp_path / "test.npy"),
                      "--out", str(out), "--repeats", "1", "--no-progress").stdout  # fmt: skip
    ev = resflow("eval", "--run", str(RUN), "--max", "50", "--no-progress").stdout
    assert _mean(printed) == _mean(ev)
    assert "1 draw per input (its estimator noise is not measured" in printed
    rows = out.read_text().splitlines()
    assert rows[0] == "source,name,bits_per_dim,stderr" and len(rows) == 51
    assert all(r.endswith(",") for r in rows[1:])  # one draw of a stochastic model: unknown
    values = np.array([float(r.rsplit(",", 2)[1]) for r in rows[1:]])
    mean = float(_mean(ev).split()[0])
    assert values.mean() == pytest.approx(mean, abs=6e-5)


def test_per_example_scores_average_to_evaluate():
    x = RunFolder(RUN).load_data().test[:40]
    torch.manual_seed(0)  # fresh models: each use refreshes the Lipschitz estimates
    v = per_example(RunFolder(RUN).load_model(), x, batch_size=16)
    torch.manual_seed(0)
    res = evaluate(RunFolder(RUN).load_model(), x, batch_size=16)
    assert v.shape == (40,) and float(v.mean()) == pytest.approx(res.mean, rel=1e-12)


def test_folders_json_histogram_and_data_set_inputs(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    out, png = tmp_path / "s.json", tmp_path / "h.png"
    printed = resflow("score", "--run", str(RUN), "--input", str(folder), "--input", "digits",
                      "--max", "20", "--out", str(out), "--plot", str(png),
                      "--no-progress").stdout  # fmt: skip
    record = json.loads(out.read_text())
    assert record["unit"] == "bits/dim"
    noise, digits = record["sources"]
    assert [s["name"] for s in noise["scores"]] == ["0.png", "1.png", "2.png"]
    assert digits["n"] == 20 and "digits (test)" in printed
    assert noise["mean"] > digits["mean"] + 0.5  # noise is far less likely than digits
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "/nonexistent", "--input", "x.npy"], "no checkpoint"),
        (["--run", str(RUN), "--input", "/nonexistent-dir/"], "no such file or folder"),
        (["--run", str(RUN), "--input", "nope-data"], "no such file or folder, nor a data set"),
        (["--run", str(RUN), "--input", "digits", "--out", "s.txt"], "written as .csv or .json"),
    ],
)
def test_user_errors_are_one_line(args, message):
    bad = resflow("score", *args, check=False)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_wrong_image_size_and_values_are_refused(tmp_path):
    from PIL import Image

    model = RunFolder(RUN).load_model()
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(ValueError, match="the images are 28x28; the model takes 8x8"):
        load_inputs(folder, model)
    np.save(tmp_path / "bad.npy", np.full((2, 8, 8), 200, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"pixel values must lie in 0..16"):
        load_inputs(tmp_path / "bad.npy", model)
    bad = resflow("score", "--run", str(RUN), "--input", str(folder), check=False)
    assert bad.returncode == 2 and "28x28" in bad.stderr


def test_levels_and_auroc():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert to_levels(x, 32).tolist() == [0, 16, 31]
    assert to_levels(x, 17).tolist() == [0, 8, 16]
    a, b = torch.arange(10.0), torch.arange(10.0) + 100
    assert auroc(a, b) == 1.0 and auroc(b, a) == 0.0
    assert auroc(a, a) == pytest.approx(0.5)


def test_score_module_is_documented():
    assert "resflow score" in (Path(__file__).parents[1] / "src/resflow/scoring.py").read_text()


def test_each_input_gets_a_standard_error_from_independent_draws(tmp_path):
    """The digits model is stochastic (dequantization, Hutchinson vectors, roulette):
    by default each input is drawn 4 times and its standard error written beside it."""
    x = RunFolder(RUN).load_data().test[:12]
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "s.csv"
    printed = resflow("score", "--run", str(RUN), "--input", str(tmp_path / "x.npy"), "--out",
                      str(out), "--no-progress").stdout  # fmt: skip
    assert f"(n=12), {DEFAULT_REPEATS} draws per input; estimator noise +- 0.0" in printed
    rows = [r.split(",") for r in out.read_text().splitlines()[1:]]
    se = np.array([float(r[3]) for r in rows])
    assert len(rows) == 12 and (se > 0).all() and (se < 0.5).all()
    # the file's figures: the mean over inputs and its SE across them, the noise part
    model = RunFolder(RUN).load_model()
    torch.manual_seed(0)
    scores = score(model, x, hutchinson=4)
    assert scores.repeats == DEFAULT_REPEATS and scores.hutchinson == 4 and not scores.exact
    summary = scores.summary("bits/dim")
    assert summary.stderr == pytest.approx(float(scores.values.std()) / 12**0.5)
    assert 0 < scores.noise_stderr() < summary.stderr
    assert "4 Hutchinson vectors" in str(summary)


def test_hutchinson_vectors_are_recorded_and_a_deterministic_model_is_exact(tmp_path):
    out = tmp_path / "s.json"
    resflow("score", "--run", str(RUN), "--input", "digits", "--max", "6", "--repeats", "2",
            "--hutchinson", "3", "--out", str(out), "--no-progress")  # fmt: skip
    (src,) = json.loads(out.read_text())["sources"]
    assert src["repeats"] == 2 and src["hutchinson"] == 3 and src["noise_stderr"] > 0
    assert all(s["stderr"] > 0 for s in src["scores"])
    np.savetxt(tmp_path / "v.csv", np.random.default_rng(0).normal(size=(5, 2)), delimiter=",")
    printed = resflow("score", "--run", str(VEC), "--input", str(tmp_path / "v.csv"), "--out",
                      str(out), "--no-progress", "--overwrite").stdout  # fmt: skip
    assert "nats (n=5), exact" in printed
    (src,) = json.loads(out.read_text())["sources"]
    assert src["repeats"] == 1 and src["noise_stderr"] == 0
    assert all(s["stderr"] == 0 for s in src["scores"])


def test_standard_errors_by_hand(tmp_path):
    draws = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    sc = Scores(draws)
    torch.testing.assert_close(sc.values, torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sc.stderr, torch.tensor([1 / 3**0.5, 0.0], dtype=torch.float64))
    assert sc.noise_stderr() == pytest.approx((1 / 3) ** 0.5 / 2)
    assert sc.summary("nats").stderr == 0.0  # the two means agree
    once = Scores(draws[:, :1])
    assert torch.isnan(once.stderr).all() and math.isnan(once.noise_stderr())
    assert (Scores(draws[:, :1], exact=True).stderr == 0).all()
    inp = ScoreInput("a,b", ["x", "y"], torch.zeros(2, 1))
    write_scores(tmp_path / "s.csv", [inp], [once], "nats")
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "source,name,nll_nats,stderr",
        '"a,b",x,1,',
        '"a,b",y,2,',
    ]
    write_scores(tmp_path / "s.json", [inp], [sc], "nats")
    (src,) = json.loads((tmp_path / "s.json").read_text())["sources"]
    assert [s["stderr"] for s in src["scores"]] == pytest.approx([1 / 3**0.5, 0.0])


def test_csv_with_a_header_row(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(4, 2))
    np.savetxt(tmp_path / "plain.csv", rows, delimiter=",")
    np.savetxt(tmp_path / "named.csv", rows, delimiter=",", header='"x", y', comments="")
    model = RunFolder(VEC).load_model()
    plain, named = (
        load_inputs(tmp_path / "plain.csv", model),
        load_inputs(tmp_path / "named.csv", model),
    )
    assert plain.columns is None and named.columns == ["x", "y"]
    assert torch.equal(plain.data, named.data) and len(named.data) == 4
    assert named.names == ["0", "1", "2", "3"]  # rows numbered after the header
    (tmp_path / "bad.csv").write_text("x,y,z\n1,2\n")
    with pytest.raises(ValueError, match="the header names 3 columns, the rows have 2"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("x,y\n")
    with pytest.raises(ValueError, match="no inputs"):
        load_inputs(tmp_path / "empty.csv", model)
    out = tmp_path / "s.json"
    resflow("score", "--run", str(VEC), "--input", str(tmp_path / "named.csv"), "--out", str(out),
            "--no-progress")  # fmt: skip
    (src,) = json.loads(out.read_text())["sources"]
    assert src["columns"] == ["x", "y"] and src["n"] == 4


def test_score_spends_the_hutchinson_vectors_asked_for(monkeypatch):
    import resflow.scoring as scoring
    from resflow.layers import ResidualBlock

    model = RunFolder(RUN).load_model()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    seen = []

    def draws(model, data, repeats, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append({b.eval_estimator.n_hutchinson for b in blocks})
        return torch.zeros(len(data), repeats, dtype=torch.float64)

    monkeypatch.setattr(scoring, "per_example_draws", draws)
    x = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    assert score(model, x, hutchinson=7).repeats == DEFAULT_REPEATS
    assert score(model, x, repeats=2).repeats == 2
    assert blocks and seen == [{7}, {1}]
    assert {b.eval_estimator.n_hutchinson for b in blocks} == {1}  # restored
