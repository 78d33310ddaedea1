"""Host reads and operators per training step: the baseline of the synchronization-free
step (on a GPU every read of a device value on the host waits for the device).

    python benchmarks/host_reads.py
    python benchmarks/host_reads.py --presets toy2d digits-small --steps 20

For each preset: a few steps past the first certificate, then ``--steps`` steps in which
every read of a tensor's value on the host is counted (``item``, ``float``, ``int``,
``bool``, ``tolist``: on a CPU they cost nothing, on a GPU each one synchronizes), split
into steps that certify the Lipschitz bounds and steps that only refresh them, with the
adaptive power iteration and with a fixed number (``power_iterations``); and the number
of operators of one steady-state step (``torch.profiler``). Writes
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
from resflow.models import PRESETS, get_preset
from resflow.training import Trainer

READS = ("item", "__float__", "__int__", "__bool__", "tolist")
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
def counting(counter: collections.Counter[str]) -> Iterator[None]:
    """Count every host read of a tensor's value inside the block, by the resflow line
    that asked for it."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str) -> Any:
        original = saved[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter[_where()] += 1
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
    per_step: list[tuple[bool, int]] = []
    sites: collections.Counter[str] = collections.Counter()
    for _ in range(steps):
        counter: collections.Counter[str] = collections.Counter()
        certifies = (trainer.step + 1) % every == 0
        with counting(counter), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(until=trainer.step + 1)
        per_step.append((certifies, sum(counter.values())))
        if not certifies:
            sites.update(counter)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.fit(until=trainer.step + 1 if (trainer.step + 1) % every else trainer.step + 2)
    ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    refresh = [n for c, n in per_step if not c]
    cert = [n for c, n in per_step if c]
    return {
        "preset": preset,
        "power_iterations": power_iterations,
        "reads_refresh_step": sum(refresh) / max(1, len(refresh)),
        "reads_certify_step": sum(cert) / max(1, len(cert)) if cert else None,
        "aten_ops_per_step": ops,
        "refresh_step_sites": {k: v / max(1, steps) for k, v in sites.most_common(8)},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["toy2d", "digits-small", "iresnet-digits"])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for k in (0, 5):
                rows.append(measure(preset, k, args.steps, Path(tmp)))
                r = rows[-1]
                cert = "-" if r["reads_certify_step"] is None else f"{r['reads_certify_step']:.0f}"
                ops = r["aten_ops_per_step"]
                print(f"{preset:16s} power_iterations={k}: {r['reads_refresh_step']:7.1f} host "
                      f"reads per refresh step, {cert} per certifying step, {ops:,} aten "
                      "operators per step", flush=True)  # fmt: skip
                for site, n in list(r["refresh_step_sites"].items())[:4]:
                    print(f"    {n:6.1f} per step at {site}")
    save_json("host_reads", {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
