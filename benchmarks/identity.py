"""Fingerprints of the small presets, to show that a restructuring changed no number.

    python benchmarks/identity.py > before.txt      # on the code before the change
    python benchmarks/identity.py > after.txt       # on the code after it
    diff before.txt after.txt                       # empty: bit-identical

For every small preset: a few training steps from a fixed seed on small data (one
thread), then the exact bytes of the loss history (``float.hex``), a SHA-256 of every
weight and buffer, the test figure, the certificate of the residual families (bounds
and round-trip errors) and a SHA-256 of 16 samples. Any change of any bit shows.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import sys
import tempfile
from pathlib import Path

import torch

from resflow.certify import certify
from resflow.config import replace
from resflow.data import DataConfig, load_data
from resflow.models import MODELS, PRESETS, get_preset
from resflow.training import Trainer

SMALL = {  # preset: data
    "toy2d": "8gaussians",
    "iresnet-toy2d": "8gaussians",
    "maf-toy2d": "checkerboard",
    "naf-toy2d": "checkerboard",
    "realnvp-toy2d": "8gaussians",
    "glow-toy2d": "8gaussians",
    "digits-small": "digits",
    "hybrid-digits": "digits",
    "iresnet-digits": "digits",
    "realnvp-digits": "digits",
    "glow-digits": "digits",
    "flowpp-digits": "digits",
    "denseflow-digits": "digits",
    "tarflow-digits": "digits",
}


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


CLOCK = {"it_s"}  # records of the wall clock, not of the computation


def exact(value: object) -> str:
    """Every bit of a number (nested records included)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{exact(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (int, float)):
        return float(value).hex()
    return repr(value)


def fingerprint(preset: str, data_name: str, steps: int, folder: Path) -> list[str]:
    torch.manual_seed(0)
    kwargs = {"n_train": 512, "n_test": 256} if data_name != "digits" else {}
    data = load_data(DataConfig(name=data_name, **kwargs))
    entry = PRESETS.get(preset)
    cfg = replace(entry.train, steps=steps, eval_every=steps, checkpoint_every=steps,
                  log_every=1, batch_size=64, tensorboard=False, progress=False)  # fmt: skip
    model_cfg = get_preset(preset)
    if data.levels is None:
        model_cfg = MODELS.get(entry.model).adapt(model_cfg, data.shape, None)
    trainer = Trainer(model_cfg, data, cfg, folder / preset, overwrite=True)
    trainer.fit()
    result = trainer.evaluate()
    model = trainer.model
    losses = [f"{k}={exact(v)}" for rec in trainer.history for k, v in sorted(rec.items())
              if k not in CLOCK]  # fmt: skip
    state = model.state_dict()
    lines = [
        f"{preset}: losses {' '.join(losses)}",
        f"{preset}: weights {digest([state[k] for k in sorted(state)])}",
        f"{preset}: test {float(result.mean).hex()} {float(result.stderr).hex()}",
    ]
    torch.manual_seed(1)
    with torch.no_grad():
        lines.append(f"{preset}: samples {digest([model.sample(16)])}")
    if any(type(m).__name__ == "ResidualBlock" for m in model.modules()):
        cert = certify(model, data.test, n_examples=64)
        bounds = " ".join(float(b.bound).hex() for b in cert.blocks)
        lines.append(f"{preset}: certificate {cert.passed} {bounds}")
        lines.append(f"{preset}: round trip {float(cert.round_trip or 0).hex()}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--presets", nargs="*", default=list(SMALL))
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own lines
                lines = fingerprint(preset, SMALL[preset], args.steps, Path(tmp))
            print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
