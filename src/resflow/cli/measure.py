"""The commands that measure a run: ``eval``, ``score``, ``fid`` and ``check``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from resflow.certify import certify
from resflow.cli.checks import check_memory
from resflow.cli.common import (
    refuse_conditional,
    report_benchmark,
    run_data,
    run_model,
    sample_labels,
)
from resflow.config import replace
from resflow.data import DataConfig, data_kind, load_data
from resflow.evaluation import evaluate, evaluate_bounds
from resflow.layers.hooks import Classifier, implements
from resflow.runs import RunFolder


def cmd_eval(args: argparse.Namespace) -> int:
    model = run_model(args)
    data = run_data(args, model)
    test = data.test if args.max is None else data.test[: args.max]
    labels = data.test_context if model.context_features else data.test_labels
    labels = None if labels is None else labels[: len(test)]
    torch.manual_seed(args.seed)
    if args.iw_samples:
        bounds = evaluate_bounds(
            model, test, args.iw_samples, args.batch_size, not args.no_progress, labels=labels
        )
        print(f"test variational bound {bounds.elbo}")
        print(f"test importance-weighted bound, K={bounds.k}: {bounds.iw}")
        return 0
    result = evaluate(model, test, args.batch_size, progress=not args.no_progress, labels=labels)
    print(f"test {result}")
    report_benchmark(data.name, result, RunFolder(args.run).read_config().model)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Bits/dim (or NLL) of every input: folders of images, arrays, or data sets' test
    splits; each input drawn ``--repeats`` times for its standard error."""
    from resflow.evaluation import density_note
    from resflow.scoring import plot_score_histogram, score, unit_of, write_scores

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {out}: scores are written as .csv or .json")
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        raise ValueError(f"--plot {args.plot}: the histogram is a .png")
    model = run_model(args)
    refuse_conditional(model, "score")
    inputs = [_score_input(args, model, name) for name in args.input]
    if args.repeats is not None:  # every draw of every input is kept (float64)
        n = sum(len(inp.data) for inp, _ in inputs)
        check_memory(f"--repeats {args.repeats}", 8 * n * args.repeats, "lower --repeats")
    unit, scores, note = unit_of(model), [], density_note(model)
    for inp, labels in inputs:
        torch.manual_seed(args.seed)  # each input scored as `resflow eval` would score it
        sc = score(model, inp.data, args.batch_size, not args.no_progress, labels,
                   repeats=args.repeats, hutchinson=args.hutchinson)  # fmt: skip
        scores.append(sc)
        print(f"{inp.source}: {sc.summary(unit, note)}")
    write_scores(out, [i for i, _ in inputs], scores, unit)
    print(f"scores: {out}")
    if args.plot is not None:
        groups = {i.source: sc.values for (i, _), sc in zip(inputs, scores)}
        plot_score_histogram(groups, args.plot, unit, title=f"{unit} under {args.run}")
        print(f"histogram: {args.plot}")
    return 0


def _score_input(args: argparse.Namespace, model: Any, name: str) -> tuple[Any, Any]:
    """``(ScoreInput, labels or None)`` for a path, or a data set's test split (read with
    the run's data settings: bit depth, size)."""
    from resflow.scoring import ScoreInput, load_inputs

    if Path(name).exists() or Path(name).suffix:
        inp, labels = load_inputs(name, model), None
    else:
        try:
            data_kind(name)
        except ValueError:
            raise ValueError(f"--input {name}: no such file or folder, nor a data set") from None
        recorded = RunFolder(args.run).read_config().data
        cfg = DataConfig(name=name) if recorded is None else replace(recorded, name=name)
        if args.data_dir is not None:
            cfg = replace(cfg, data_dir=args.data_dir)
        data = load_data(cfg)
        if tuple(data.test.shape[1:]) != model.shape or data.levels != model.levels:
            raise ValueError(f"--input {name}: its test images {tuple(data.test.shape[1:])} with "
                             f"{data.levels} levels do not fit the model's {model.shape} with "
                             f"{model.levels}")  # fmt: skip
        test, labels = data.test, data.test_labels
        inp = ScoreInput(f"{name} (test)", [str(i) for i in range(len(test))], test)
    if args.max is not None:
        inp = ScoreInput(inp.source, inp.names[: args.max], inp.data[: args.max])
    keep = model.n_classes is not None or implements(model, Classifier)
    if labels is not None and keep:
        return inp, labels[: len(inp.data)]
    return inp, None


def cmd_fid(args: argparse.Namespace) -> int:
    """FID of the run's samples against its data (the optional ``fid`` extra)."""
    from resflow.fid import fid, inception_network

    model = run_model(args)
    if model.levels is None:
        raise ValueError("fid compares images; this run models vectors")
    check_memory(f"--n {args.n}", args.n * model.dim * 8, "lower --n")
    net = inception_network(args.device)  # a clear error before any sampling
    data = run_data(args, model)
    reference = data.train if args.reference == "train" else data.test
    torch.manual_seed(args.seed)
    labels = sample_labels(model, None, args.n)
    chunks = []
    from tqdm.auto import tqdm

    starts = range(0, args.n, args.batch_size)  # a bar with its estimate of the time left
    for start in tqdm(starts, desc="sample", unit="batch", leave=False,
                      disable=args.no_progress or len(starts) < 2):  # fmt: skip
        m = min(args.batch_size, args.n - start)
        y = None if labels is None else labels[start : start + m]
        chunks.append(model.sample(m, args.temperature, y))
    samples = torch.cat(chunks)
    value = fid(samples, reference[: args.n_reference], model.levels, net=net)
    print(f"FID {value:.2f} ({args.n} samples at temperature {args.temperature} against "
          f"{min(args.n_reference, len(reference))} {args.reference} images)")  # fmt: skip
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    model = run_model(args)
    data = run_data(args, model)
    contexts = data.test_context if model.context_features else data.test_labels
    cert = certify(model, data.test, args.n, contexts)
    for line in cert.lines():
        print(line)
    return 0 if cert.passed else 1
