"""``resflow score``: bits/dim per input, the same numbers as ``resflow eval``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from resflow.evaluation import evaluate, per_example
from resflow.runs import RunFolder
from resflow.scoring import auroc, load_inputs, to_levels
from test_cli import FIXTURES, resflow

RUN = FIXTURES / "img"  # digits, 17 levels, trained by resflow 0.1


def _mean(text: str) -> str:
    return re.search(r"(\d+\.\d+ \+- \d+\.\d+ bits/dim \(n=\d+\))", text).group(1)  # type: ignore[union-attr]


def test_score_gives_the_bits_per_dim_of_eval(tmp_path):
    test = RunFolder(RUN).load_data().test[:50]
    np.save(tmp_path / "test.npy", test.numpy())
    out = tmp_path / "scores.csv"
    printed = resflow("score", "--run", str(RUN), "--input", str(tmp_path / "test.npy"),
                      "--out", str(out), "--no-progress").stdout  # fmt: skip
    ev = resflow("eval", "--run", str(RUN), "--max", "50", "--no-progress").stdout
    assert _mean(printed) == _mean(ev)
    rows = out.read_text().splitlines()
    assert rows[0] == "source,name,bits_per_dim" and len(rows) == 51
    values = np.array([float(r.rsplit(",", 1)[1]) for r in rows[1:]])
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
