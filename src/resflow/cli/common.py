"""The run a command reads (``--run``): its model and data, with the checks every
command shares, and what every command prints the same way."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from resflow.config import parse_sets
from resflow.flow import check_finite_weights
from resflow.runs import RunFolder, check_run_record


def sample_labels(model: Any, label: int | None, n: int) -> torch.Tensor | None:
    """Class labels for ``n`` samples: ``label`` for all, else ``0..K-1`` in turn."""
    k = model.n_classes
    if label is None:
        return None if k is None else torch.arange(n) % k
    if k is None:
        raise ValueError("--label: this model is not class-conditional (train with --conditional)")
    if not 0 <= label < k:
        raise ValueError(f"--label {label} is out of range: the model has classes 0..{k - 1}")
    return torch.full((n,), label, dtype=torch.long)


def run_model(args: argparse.Namespace) -> Any:
    """The run's model, after the checks every command shares: the run's record describes
    its checkpoint, and (except for `check`, which reports it as a failed certificate)
    the weights are finite."""
    run = RunFolder(args.run)
    model = run.load_model(args.which, overrides=parse_sets(args.set) or None)
    check_run_record(run, args.which)
    if args.command != "check":
        check_finite_weights(model)
    return model


def run_data(args: argparse.Namespace, model: Any) -> Any:
    """The run's recorded data, checked against the model it is used with."""
    data = RunFolder(args.run).load_data(args.data_dir)
    if tuple(data.test.shape[1:]) != tuple(model.shape) and getattr(args, "size", None) is None:
        raise ValueError(
            f"{args.run}: its data {data.name} {tuple(data.test.shape[1:])} do not fit its "
            f"model {tuple(model.shape)}; is config.yaml copied from another run?"
        )
    if data.levels != model.levels:
        raise ValueError(
            f"{args.run}: its data {data.name} have {data.levels} levels, its model "
            f"{model.levels}; is config.yaml copied from another run (or its n_bits changed)?"
        )
    return data


def refuse_conditional(model: Any, command: str) -> None:
    """A model conditioned on a continuous context needs one for every draw or score,
    which this command's inputs do not carry: one line instead of a shape error."""
    if model.context_features:
        raise ValueError(
            f"this run is conditional on a context of {model.context_features} feature(s), "
            f"which {command} does not take; use it from Python (model.sample(n, context=c), "
            "model.log_prob(x, c), resflow.as_distribution(model, c)); `resflow eval` uses "
            "the test data's contexts"
        )


def report_benchmark(name: str, result: Any, model_config: Any = None) -> None:
    """The tabular benchmarks are reported as log-likelihoods: print it beside the
    paper's (the model family's own paper where it reports one, else NAF's)."""
    from resflow.data.tabular_benchmarks import REFERENCE_LOG_LIKELIHOOD
    from resflow.models import entry_for

    if name not in REFERENCE_LOG_LIKELIHOOD:
        return
    reference = f"NAF-DDSF(5) in its paper: {REFERENCE_LOG_LIKELIHOOD[name]}"
    if model_config is not None:
        entry = entry_for(model_config)
        own = entry.published(model_config, name) if entry.published else None
        reference = own or reference
    print(f"test log-likelihood {-result.mean:.4f} +- {result.stderr:.4f} nats ({reference})")
