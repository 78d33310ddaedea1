"""Host reads and operators per training step: the baseline of the synchronization-free
step (on a GPU every read of a device value on the host waits for the device).

    python benchmarks/host_reads.py
    python benchmarks/host_reads.py --presets toy2d digits-small --steps 20

For each preset: a few steps past the first certificate, then ``--steps`` steps in which
every read of a tensor's value on the host is counted (``item``, ``float``, ``int``,
``bool``, ``tolist``: on a CPU they cost nothing, on a GPU each one synchronizes), split
into steady-state steps, the steps that log (every 10th: the deferred value checks and
the records are read there, see :mod:`resflow.value_checks`) and those that certify the
Lipschitz bounds, with the adaptive power iteration and with a fixed number
(``power_iterations``); and the number of operators of one step (``torch.profiler``). Writes
``benchmarks/out/host_reads.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from common import machine, save_json
from torch.profiler import ProfilerActivity, profile

from resflow.config import replace
from resflow.data import DataConfig, load_data
from resflow.layers.residual import in_forward
from resflow.models import PRESETS, get_preset
from resflow.training import Trainer

READS = ("item", "__float__", "__int__", "__bool__", "tolist")
DRAWS = "roulette term counts (host generator)"
DATA = {"toy2d": "8gaussians", "toy2d-paper": "8gaussians", "digits-small": "digits",
        "mnist-small": "digits", "iresnet-digits": "digits"}  # fmt: skip


def _where() -> str:
    """The innermost resflow line on the stack (the code that asked for the value)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/resflow/" in name and "/benchmarks/" not in name:
            return f"{name.split('/resflow/')[-1]}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "elsewhere"


@contextlib.contextmanager
def counting(by_step: dict[int, collections.Counter[str]], trainer: Trainer) -> Iterator[None]:
    """Count every host read of a tensor's value inside the block, by the trainer's step
    counter and the resflow line that asked for it; the roulette's term counts, drawn
    by the host's generator (no device to wait for), under :data:`DRAWS`."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str) -> Any:
        original = saved[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            drawn = sys._getframe(1).f_code.co_name == "draw_terms"
            by_step[trainer.step][DRAWS if drawn else _where()] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def measure(preset: str, power_iterations: int, steps: int, folder: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    data = load_data(DataConfig(name=DATA.get(preset, "digits"), n_train=2048, n_test=256))
    entry = PRESETS.get(preset)
    cfg = replace(entry.train, steps=10**9, eval_every=10**9, checkpoint_every=10**9,
                  log_every=10,
                  batch_size=min(entry.train.batch_size, 64), tensorboard=False,
                  progress=False, warmup=0)  # fmt: skip
    model_cfg = get_preset(preset, power_iterations=power_iterations)
    if data.levels is None:
        from resflow.models import MODELS

        model_cfg = MODELS.get(entry.model).adapt(model_cfg, data.shape, None)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(model_cfg, data, cfg, folder / f"{preset}-{power_iterations}")
        trainer.fit(until=12)  # past the first certificate (every 10 steps)
    every = model_cfg.certify_every
    # one call of fit for all the counted steps (each call ends by reading the checks it
    # deferred); the trainer's step counter says which step a read belongs to: while step
    # s + 1 runs it reads s, and a logged step's records are written once it reads s + 1
    by_step: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    start = trainer.step
    with counting(by_step, trainer), contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(until=start + steps + 1)
    kinds: dict[str, list[int]] = {"steady": [], "logged": [], "certifying": []}
    draws: list[int] = []
    sites: collections.Counter[str] = collections.Counter()
    for s in range(start + 1, start + steps):  # the first and last: entering and leaving fit
        counter = by_step[s]
        kind = "certifying" if (s + 1) % every == 0 else "logged" if s % 10 == 0 else "steady"
        draws.append(counter.pop(DRAWS, 0))
        kinds[kind].append(sum(counter.values()))
        if kind == "steady":
            sites.update(counter)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(until=trainer.step + 1 if (trainer.step + 1) % every else trainer.step + 2)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    def mean(xs: list[int]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    n_steady = max(1, len(kinds["steady"]))
    return {
        "preset": preset,
        "power_iterations": power_iterations,
        "reads_steady_step": mean(kinds["steady"]),
        "reads_logged_step": mean(kinds["logged"]),
        "reads_certify_step": mean(kinds["certifying"]),
        "host_draws_per_step": mean(draws),
        "aten_ops_per_step": ops,
        "steady_step_sites": {k: v / n_steady for k, v in sites.most_common(8)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["toy2d", "digits-small", "iresnet-digits"])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    # the code paths of an accelerator: the reads made only where they are free (on the
    # CPU, e.g. the closed-form backward's scale) are off, as on a GPU
    in_forward.reads_are_free = lambda t: False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for k in (0, 5):
                rows.append(measure(preset, k, args.steps, Path(tmp)))
                r = rows[-1]

                def fmt(x: float | None) -> str:
                    return "-" if x is None else f"{x:.1f}"

                print(f"{preset:16s} power_iterations={k}: host reads per step: steady "
                      f"{fmt(r['reads_steady_step'])}, logged {fmt(r['reads_logged_step'])}, "
                      f"certifying {fmt(r['reads_certify_step'])} (and "
                      f"{fmt(r['host_draws_per_step'])} roulette draws); "
                      f"{r['aten_ops_per_step']:,} aten operators per step",
                      flush=True)  # fmt: skip
                for site, n in list(r["steady_step_sites"].items())[:4]:
                    print(f"    {n:6.1f} per steady step at {site}")
    save_json("host_reads", {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
