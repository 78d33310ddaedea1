"""Working with a finished (or interrupted) run folder: load its model, evaluate, sample.

A run folder is what :class:`resflow.training.Trainer` writes: ``config.yaml``,
``last.pt``, ``best.pt`` ...; every checkpoint holds plain data only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from resflow.flow import Flow
from resflow.layers.lipschitz import refresh_lipschitz
from resflow.models.residual_flow import build_model, config_from_dict
from resflow.training.checkpoint import CheckpointError, load_checkpoint


def load_model(run: str | Path, which: str = "best", ema: bool = True) -> Flow:
    """The model of a run (``which`` = ``best`` / ``last`` or a ``.pt`` path), in eval
    mode, with the EMA weights by default (as the paper evaluates)."""
    run = Path(run)
    path = run if run.suffix == ".pt" else run / f"{which}.pt"
    if not path.exists() and which == "best" and run.suffix != ".pt":
        path = run / "last.pt"  # no evaluation happened yet
    if not path.exists():
        raise CheckpointError(f"no checkpoint {path} (is {run} a resflow run folder?)")
    state = load_checkpoint(path)
    model = build_model(config_from_dict(state["model_config"]))
    model.load_state_dict(state["model"])  # also loads ActNorm's initialised flags
    if ema and "ema" in state:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in state["ema"]["shadow"]:
                    p.copy_(state["ema"]["shadow"][name])
    model.eval()
    refresh_lipschitz(model)
    return model
