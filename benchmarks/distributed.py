"""Training throughput (images/s) with 1 and 2 data-parallel processes (torchrun + DDP).

    python benchmarks/distributed.py                      # CPU, gloo: 1 and 2 processes
    python benchmarks/distributed.py --device cuda --nproc 1 2 4 --batch-size 256

Each configuration is one ``torchrun`` launch of this file (``--worker``): the
:class:`~resflow.training.Trainer` trains the ``--preset`` (default: the README's
``digits-small`` Residual Flow, the paper's stochastic estimator) on the embedded 8x8
digits with the same global batch, so the numbers compare the same optimisation
(identical steps up to the estimator's random draws). The first ``--warmup`` steps
(ActNorm initialisation, DDP set-up) are not timed. On the CPU the cores are split
between the processes (``--threads`` in total), so 2 processes do not get more
compute than 1, only another way of using it. Results: ``benchmarks/out/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, save_json

from resflow.data import load_data
from resflow.models import get_preset
from resflow.training import TrainConfig, Trainer
from resflow.training.distributed import shutdown


def worker(args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, args.threads // world))
    data = load_data("digits")
    cfg = TrainConfig(steps=args.warmup + args.steps + 1, batch_size=args.batch_size,
                      warmup=10, eval_every=10**6, checkpoint_every=10**6, log_every=10**6,
                      tensorboard=False, progress=False, device=args.device)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp) / f"run{world}"
        trainer = Trainer(get_preset(args.preset), data, cfg, out, overwrite=True)
        trainer.fit(until=args.warmup)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.fit(until=args.warmup + args.steps)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if trainer.dist.is_main:
            record = {"processes": world, "threads_per_process": torch.get_num_threads(),
                      "seconds": seconds, "steps": args.steps, "batch_size": args.batch_size,
                      "images_per_s": args.steps * args.batch_size / seconds}  # fmt: skip
            print("RESULT " + json.dumps(record), flush=True)
    shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits-small")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all processes)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in total")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=None, help="run folders (default: a temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for n in args.nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, "--worker",
               "--preset", args.preset, "--batch-size", str(args.batch_size), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--device", args.device]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // n))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{n} process(es) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
        r = rows[-1]
        per_step = r["seconds"] / r["steps"]
        print(f"{n} process(es) x {r['threads_per_process']} thread(s): "
              f"{r['images_per_s']:.1f} images/s ({per_step:.3f} s/step)")  # fmt: skip
    record = {"machine": machine(), "device": args.device, "preset": args.preset, "rows": rows}
    print(f"machine: {record['machine']}; wrote {save_json('distributed', record)}")


if __name__ == "__main__":
    main()
