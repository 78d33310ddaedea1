"""One rank of the data-parallel tests (tests/training/test_distributed.py), launched as
``python -m torch.distributed.run --nproc_per_node=2 distributed_worker.py OUT``.

Each scenario trains a tiny model with the Trainer exactly as a user would (the process
group comes from torchrun's environment) and saves what the test compares into
``OUT/<scenario>-rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from distributed_scenarios import SCENARIOS, run_scenario  # type: ignore[import-not-found]

from resflow.data import DataConfig
from resflow.training.distributed import load_shared, shutdown


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names or list(SCENARIOS):
        trainer, result = run_scenario(name, out / name)
        rank = trainer.dist.rank
        assert trainer.dist.world_size == 2, trainer.dist
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                "buffers": {n: b.detach().clone() for n, b in trainer.model.named_buffers()},
                "ema": dict(trainer.ema.shadow),
                "history": result.history,
                "final": None if result.final is None else result.final.mean,
                "draw": torch.rand(4),  # the ranks' random streams must differ
            },
            out / f"{name}-rank{rank}.pt",
        )
    if not names:  # one copy of the data per machine, mapped by both processes
        split = load_shared(DataConfig("8gaussians", n_train=256, n_test=64), trainer.dist)
        torch.save({"train": split.train.clone(), "test": split.test.clone(), "name": split.name},
                   out / f"shared-rank{rank}.pt")  # fmt: skip
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
