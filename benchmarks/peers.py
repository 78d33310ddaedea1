"""resflow's vector flows against zuko, normflows and nflows, each trained for the same
CPU time (one thread) on the same data.

    python benchmarks/peers.py                                  # 60 CPU-s a model, 2 repeats
    python benchmarks/peers.py --budget 30 --repeats 2
    python benchmarks/peers.py --models maf nsf zuko-maf zuko-nsf --datasets 8gaussians
    python benchmarks/peers.py --quick                          # a smoke run, seconds

The peers are an optional extra (``pip install resflow[peers]``); a library that does
not import is skipped, and the output says so.

* **Densities.** Every registered model of kind ``vector``, with the preset the CLI picks
  for vector data, trained by :class:`resflow.training.Trainer` with the preset's own
  :class:`TrainConfig` (its learning rate, warm-up, clipping and EMA; the EMA weights are
  evaluated), against the peers' counterparts (:data:`PEERS`) built as their
  documentation shows for 2-D densities, at the sizes of the resflow presets, trained
  with Adam (lr 1e-3, batch 500) and evaluated as trained (no EMA). Each model gets
  ``--budget`` CPU seconds (``time.process_time``, model construction included) per
  data set and repeat. Interleaved: for each repeat, for each data set, every model in
  turn; the seeds (data and model) change with the repeat. Reported: the test NLL in
  nats (mean +- SE over the repeats, on 10,000 fresh test points) beside the data's
  entropy, and samples per CPU second (10,000 drawn).
* **Conditional densities.** ``c ~ U(-2, 2)``, ``x | c ~ N((c, c^2/2 - 1),
  diag(0.3 + 0.2 |c|)^2)``: resflow's MAF and NSF with a 1-D context against zuko's,
  same sizes, each trained by one plain Adam loop (lr 1e-3, batch 500 fresh draws) for
  the same CPU time; reported: the KL from the true conditional, the mean of
  ``log p_true - log p_model`` over 10,000 fresh draws (+- SE over the repeats).
* **Tabular benchmarks** (POWER, GAS, HEPMASS, MINIBOONE, BSDS300): the same comparison
  where the MAF archive is found (``--data-dir`` or ``$RESFLOW_DATA_DIR``); otherwise
  skipped, with the reason in the output and the JSON.

Writes ``benchmarks/out/peers.json`` and the bar plot ``benchmarks/out/peers.png``
(``peers_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import OUT, machine, save_json
from densities import vector_families
from torch import Tensor, nn

from resflow.config import replace
from resflow.data import DataSplit, load_data
from resflow.data.tabular_benchmarks import BENCHMARKS
from resflow.data.toy2d import toy_entropy
from resflow.flow import Flow
from resflow.layers.base import after_optimizer_step
from resflow.models import MODELS, build_model, count_parameters, get_preset
from resflow.models.registry import Preset
from resflow.training import Trainer

TOY = ("8gaussians", "checkerboard")
TABULAR = tuple(BENCHMARKS)
PEER_LR = 1e-3
PEER_BATCH = 500
N_TRAIN = 50_000


# ---- a model behind one interface ------------------------------------------------------
@dataclass
class Model:
    """A trainable flow of any library: its module, ``log_prob(x, c)``, ``sample(n)``
    and a hook run after each optimizer step."""

    module: nn.Module
    log_prob: Callable[[Tensor, Tensor | None], Tensor]
    sample: Callable[[int], Tensor]
    after_step: Callable[[], None] = lambda: None
    grad_eval: bool = False  # log_prob needs autograd even in evaluation


def from_resflow(flow: Flow) -> Model:
    return Model(flow, flow.log_prob, flow.sample, lambda: after_optimizer_step(flow))


def from_zuko(flow: nn.Module) -> Model:
    return Model(flow, lambda x, c: flow(c).log_prob(x), lambda n: flow().sample((n,)))


def from_normflows(flow: nn.Module, after_step: Callable[[], None] | None = None) -> Model:
    return Model(flow, lambda x, c: flow.log_prob(x), lambda n: flow.sample(n)[0],
                 after_step or (lambda: None), grad_eval=after_step is not None)  # fmt: skip


def from_nflows(flow: nn.Module) -> Model:
    return Model(flow, lambda x, c: flow.log_prob(x, context=c), lambda n: flow.sample(n))


# ---- the peers, at the sizes of resflow's presets ----------------------------------------
def zuko_maf(dim: int, context: int) -> Model:
    import zuko

    return from_zuko(zuko.flows.MAF(dim, context, transforms=5, hidden_features=(64, 64)))


def zuko_nsf(dim: int, context: int) -> Model:
    import zuko

    return from_zuko(zuko.flows.NSF(dim, context, bins=8, transforms=4, hidden_features=(64, 64)))


def zuko_naf(dim: int, context: int) -> Model:
    import zuko

    return from_zuko(zuko.flows.NAF(dim, context, transforms=3, signal=16,
                                    hidden_features=(64, 64)))  # fmt: skip


def _normflows(flows: list[nn.Module], dim: int) -> nn.Module:
    import normflows as nf

    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)


def normflows_realnvp(dim: int, context: int) -> Model:
    import normflows as nf

    flows: list[nn.Module] = []
    for _ in range(8):
        net = nf.nets.MLP([dim - dim // 2, 64, 64, 2 * (dim // 2)], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="swap")]
    return from_normflows(_normflows(flows, dim))


def normflows_maf(dim: int, context: int) -> Model:
    import normflows as nf

    flows: list[nn.Module] = []
    for _ in range(5):
        flows += [nf.flows.MaskedAffineAutoregressive(dim, 64, num_blocks=2),
                  nf.flows.Permute(dim, mode="swap")]  # fmt: skip
    return from_normflows(_normflows(flows, dim))


def normflows_nsf(dim: int, context: int) -> Model:
    import normflows as nf

    flows: list[nn.Module] = []
    for _ in range(4):
        flows += [nf.flows.CoupledRationalQuadraticSpline(dim, 2, 64, num_bins=8, tail_bound=5.0),
                  nf.flows.LULinearPermute(dim)]  # fmt: skip
    return from_normflows(_normflows(flows, dim))


def normflows_residual(dim: int, context: int) -> Model:
    import normflows as nf

    flows: list[nn.Module] = []
    for _ in range(20):
        net = nf.nets.LipschitzMLP([dim, 64, 64, dim], lipschitz_const=0.98, init_zeros=True)
        flows += [nf.flows.Residual(net, reduce_memory=True), nf.flows.ActNorm(dim)]
    flow = _normflows(flows, dim)
    return from_normflows(flow, lambda: nf.utils.update_lipschitz(flow, 50))


def _nflows(layers: list[nn.Module], dim: int) -> nn.Module:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow as NFlow
    from nflows.transforms import CompositeTransform

    return NFlow(CompositeTransform(layers), StandardNormal([dim]))


def nflows_maf(dim: int, context: int) -> Model:
    from nflows.transforms import MaskedAffineAutoregressiveTransform, ReversePermutation

    layers: list[nn.Module] = []
    for _ in range(5):
        made = MaskedAffineAutoregressiveTransform(dim, 64, context or None, num_blocks=2)
        layers += [ReversePermutation(dim), made]
    return from_nflows(_nflows(layers, dim))


def nflows_nsf_coupling(dim: int, context: int) -> Model:
    from nflows.nn.nets import ResidualNet
    from nflows.transforms import LULinear, PiecewiseRationalQuadraticCouplingTransform
    from nflows.utils.torchutils import create_alternating_binary_mask

    def net(i: int, o: int) -> nn.Module:
        return ResidualNet(i, o, hidden_features=64, context_features=context or None,
                           num_blocks=2)  # fmt: skip

    layers: list[nn.Module] = []
    for k in range(4):
        mask = create_alternating_binary_mask(dim, even=k % 2 == 0)
        spline = PiecewiseRationalQuadraticCouplingTransform(
            mask, net, num_bins=8, tails="linear", tail_bound=5.0
        )
        layers += [LULinear(dim, identity_init=True), spline]
    return from_nflows(_nflows(layers, dim))


def nflows_nsf_autoregressive(dim: int, context: int) -> Model:
    from nflows.transforms import LULinear, MaskedPiecewiseRationalQuadraticAutoregressiveTransform

    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [LULinear(dim, identity_init=True),
                   MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                       dim, 64, context or None, num_bins=8, tails="linear", tail_bound=5.0,
                       num_blocks=2)]  # fmt: skip
    return from_nflows(_nflows(layers, dim))


@dataclass(frozen=True)
class Peer:
    """A peer library's model: its name here, its library, the resflow model it is the
    namesake of, its settings in words and its builder ``(features, context) -> Model``."""

    name: str
    library: str
    namesake: str | None
    settings: str
    build: Callable[[int, int], Model]


PEERS: tuple[Peer, ...] = (
    Peer("zuko-maf", "zuko", "maf", "MAF, 5 transforms, MADE (64, 64)", zuko_maf),
    Peer("zuko-nsf", "zuko", "nsf",
         "NSF (autoregressive RQ splines on [-5, 5]), 4 transforms, 8 bins, MADE (64, 64)",
         zuko_nsf),
    Peer("zuko-naf", "zuko", "naf", "NAF (monotonic MLP), 3 transforms, signal 16, MADE (64, 64)",
         zuko_naf),
    Peer("normflows-realnvp", "normflows", "realnvp-vector",
         "8 x (AffineCouplingBlock, MLP (64, 64) zero-init; swap)", normflows_realnvp),
    Peer("normflows-maf", "normflows", "maf",
         "5 x (MaskedAffineAutoregressive, 64 hidden, 2 blocks; swap)", normflows_maf),
    Peer("normflows-nsf", "normflows", "nsf",
         "4 x (CoupledRationalQuadraticSpline, 2 blocks of 64, 8 bins, tails 5; LULinearPermute)",
         normflows_nsf),
    Peer("normflows-residual", "normflows", "residual-flow-vector",
         "20 x (Residual(LipschitzMLP (64, 64), L 0.98); ActNorm), update_lipschitz(50) "
         "after each step", normflows_residual),
    Peer("nflows-maf", "nflows", "maf",
         "5 x (ReversePermutation, MaskedAffineAutoregressive, 64 hidden, 2 blocks)", nflows_maf),
    Peer("nflows-nsf-coupling", "nflows", "nsf",
         "4 x (LULinear, RQ coupling, ResidualNet 64 x 2 blocks, 8 bins, linear tails 5)",
         nflows_nsf_coupling),
    Peer("nflows-nsf-ar", "nflows", "nsf",
         "4 x (LULinear, RQ autoregressive, MADE 64 x 2 blocks, 8 bins, linear tails 5)",
         nflows_nsf_autoregressive),
)  # fmt: skip
CONDITIONAL = ("maf", "nsf", "zuko-maf", "zuko-nsf")


def importable(library: str) -> bool:
    try:
        return importlib.util.find_spec(library) is not None and bool(__import__(library))
    except Exception:  # a library that is there but does not import is skipped too
        return False


# ---- training under a CPU budget ----------------------------------------------------------
@dataclass
class Fitted:
    model: Model
    steps: int
    cpu_s: float


class Diverged(RuntimeError):
    pass


def fit_resflow(preset: Preset, data: DataSplit, budget: float, seed: int) -> Fitted:
    """``preset`` trained by the Trainer with its own TrainConfig, in chunks until
    ``budget`` CPU seconds are spent; the EMA weights, in eval mode."""
    cfg = replace(preset.train, steps=10**9, eval_every=10**9, checkpoint_every=10**9,
                  tensorboard=False, progress=False, seed=seed)  # fmt: skip
    model_cfg = get_preset(preset.name)
    if tuple(data.shape) != (model_cfg.dim,):
        model_cfg = MODELS.get(preset.model).adapt(model_cfg, data.shape, None)
    t0 = time.process_time()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model_cfg, data, cfg, out)
        chunk, used = 1, 0.0
        while trainer.step == 0 or used < budget:
            trainer.fit(until=trainer.step + chunk)
            used = time.process_time() - t0
            per_step = used / trainer.step
            chunk = max(1, min(int(2.0 / per_step), math.ceil((budget - used) / per_step)))
    model = trainer.model
    assert trainer.ema is not None
    trainer.ema.copy_to(model)
    model.eval()
    after_optimizer_step(model)
    return Fitted(from_resflow(model), trainer.step, used)


def fit_adam(
    model_fn: Callable[[], Model],
    batches: Callable[[torch.Generator], tuple[Tensor, Tensor | None]],
    budget: float,
    seed: int,
) -> Fitted:
    """A plain Adam loop (lr :data:`PEER_LR`) on ``batches`` until ``budget`` CPU
    seconds are spent (the model's construction included); the model in eval mode."""
    t0 = time.process_time()
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.Adam(model.module.parameters(), lr=PEER_LR)
    g = torch.Generator().manual_seed(seed)
    model.module.train()
    steps = 0
    while steps == 0 or time.process_time() - t0 < budget:
        x, c = batches(g)
        loss = -model.log_prob(x, c).mean()
        if not torch.isfinite(loss):
            raise Diverged(f"the loss became {float(loss)} at step {steps}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_step()
        steps += 1
    used = time.process_time() - t0
    model.module.eval()
    return Fitted(model, steps, used)


# ---- measurements ------------------------------------------------------------------------
def log_prob(model: Model, x: Tensor, c: Tensor | None = None, batch: int = 10_000) -> Tensor:
    parts = []
    with torch.set_grad_enabled(model.grad_eval):
        for i in range(0, len(x), batch):
            part_c = None if c is None else c[i : i + batch]
            parts.append(model.log_prob(x[i : i + batch], part_c).detach())
    return torch.cat(parts)


def mean_se(values: Tensor | list[float]) -> tuple[float, float]:
    v = torch.as_tensor(values, dtype=torch.float64)
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def sampling_rate(model: Model, n: int) -> tuple[float, float]:
    """Samples per CPU second drawing ``n`` at once, and the fraction that are finite."""
    t0 = time.process_time()
    with torch.set_grad_enabled(model.grad_eval):
        x = model.sample(n).detach()
    cpu = time.process_time() - t0
    return n / max(cpu, 1e-9), float(torch.isfinite(x).all(1).double().mean())


def density_jobs(
    presets: dict[str, Preset], peers: list[Peer], data: DataSplit, budget: float, seed: int
) -> list[tuple[str, Callable[[], Fitted]]]:
    """Every model's training on ``data``, in the order they run."""
    train = data.train

    def batches(g: torch.Generator) -> tuple[Tensor, None]:
        return train[torch.randint(len(train), (PEER_BATCH,), generator=g)], None

    def peer_job(q: Peer) -> Callable[[], Fitted]:
        return lambda: fit_adam(lambda: q.build(data.shape[0], 0), batches, budget, seed)

    jobs = [(n, lambda q=q: fit_resflow(q, data, budget, seed)) for n, q in presets.items()]
    return jobs + [(q.name, peer_job(q)) for q in peers]


def warm_up(presets: dict[str, Preset], peers: list[Peer], data: DataSplit) -> None:
    """Build every model once and take a step (one-off imports and caches are not
    charged to the first model timed)."""
    jobs: list[Callable[[], Fitted]] = [
        lambda q=q: fit_resflow(q, data, 0.0, 0) for q in presets.values()
    ]
    jobs += [
        lambda q=q: fit_adam(
            lambda: q.build(data.shape[0], 0), lambda g: (data.train[:8], None), 0.0, 0
        )
        for q in peers
    ]
    for job in jobs:
        try:
            job()
        except (Diverged, RuntimeError, ValueError):
            pass


def run_density(
    name: str, run: Callable[[], Fitted], data: DataSplit, n_samples: int
) -> dict[str, Any]:
    try:
        fitted = run()
    except (Diverged, RuntimeError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    lp = log_prob(fitted.model, data.test)
    finite = torch.isfinite(lp)
    rate, sample_finite = sampling_rate(fitted.model, n_samples)
    nll, se = mean_se(-lp)
    return {"nll": nll, "nll_se_points": se, "test_finite": float(finite.double().mean()),
            "steps": fitted.steps, "cpu_s": fitted.cpu_s,
            "parameters": count_parameters(fitted.model.module),
            "samples_per_cpu_s": rate, "samples_finite": sample_finite}  # fmt: skip


# ---- the conditional toy ------------------------------------------------------------------
def conditional_draws(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``c ~ U(-2, 2)``, ``x | c ~ N((c, c^2/2 - 1), diag(0.3 + 0.2 |c|)^2)``."""
    c = torch.rand(n, 1, generator=g) * 4 - 2
    mean = torch.cat([c, c**2 / 2 - 1], 1)
    x = mean + (0.3 + 0.2 * c.abs()) * torch.randn(n, 2, generator=g)
    return x, c


def conditional_log_prob(x: Tensor, c: Tensor) -> Tensor:
    mean = torch.cat([c, c**2 / 2 - 1], 1)
    return torch.distributions.Normal(mean, 0.3 + 0.2 * c.abs()).log_prob(x).sum(1)


def conditional_builder(name: str, presets: dict[str, Preset]) -> Callable[[], Model]:
    peer = next((p for p in PEERS if p.name == name), None)
    if peer is not None:
        return lambda: peer.build(2, 1)
    config = replace(get_preset(presets[name].name), context_features=1)
    return lambda: from_resflow(build_model(config))


def run_conditional(
    name: str, presets: dict[str, Preset], budget: float, seed: int, n_test: int
) -> dict[str, Any]:
    build = conditional_builder(name, presets)
    try:
        fitted = fit_adam(build, lambda g: conditional_draws(PEER_BATCH, g), budget, seed)
    except (Diverged, RuntimeError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    x, c = conditional_draws(n_test, torch.Generator().manual_seed(10_000 + seed))
    gap = conditional_log_prob(x, c) - log_prob(fitted.model, x, c)
    kl, se = mean_se(gap)
    return {"kl": kl, "kl_se_points": se, "steps": fitted.steps, "cpu_s": fitted.cpu_s,
            "parameters": count_parameters(fitted.model.module)}  # fmt: skip


# ---- summaries, tables, plot --------------------------------------------------------------
def summarize(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean +- SE over the repeats of ``key``; the runs that failed, counted."""
    good = [r for r in runs if key in r]
    out: dict[str, Any] = {"repeats": len(good), "failed": len(runs) - len(good)}
    if good:
        out[key], out[f"{key}_se"] = mean_se([r[key] for r in good])
        for k in ("steps", "samples_per_cpu_s", "test_finite", "samples_finite"):
            if k in good[0]:
                out[k] = sum(r[k] for r in good) / len(good)
        out["parameters"] = good[0]["parameters"]
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def fmt(mean: float | None, se: float | None) -> str:
    if mean is None:
        return "failed"
    return f"{mean:.3f} ± {se:.3f}" if se is not None and math.isfinite(se) else f"{mean:.3f}"


def density_table(name: str, rows: dict[str, dict[str, Any]], entropy: float | None) -> str:
    ent = "" if entropy is None else f" (entropy {entropy:.3f} nats)"
    lines = [f"**{name}**{ent}", "",
             "| model | library | parameters | steps | test NLL (nats) | NLL − entropy "
             "| samples / CPU-s |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model, r in rows.items():
        nll = r.get("nll")
        gap = "" if nll is None or entropy is None else f"{nll - entropy:+.3f}"
        rate = f"{r['samples_per_cpu_s']:,.0f}" if "samples_per_cpu_s" in r else ""
        steps = f"{r['steps']:,.0f}" if "steps" in r else ""
        params = f"{r['parameters']:,}" if "parameters" in r else ""
        lines.append(f"| {model} | {r['library']} | {params} | {steps} "
                     f"| {fmt(nll, r.get('nll_se'))} | {gap} | {rate} |")  # fmt: skip
    return "\n".join(lines)


def conditional_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | library | parameters | steps | KL(p_true ‖ p_model) (nats) |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for model, r in rows.items():
        steps = f"{r['steps']:,.0f}" if "steps" in r else ""
        params = f"{r['parameters']:,}" if "parameters" in r else ""
        lines.append(f"| {model} | {r['library']} | {params} | {steps} "
                     f"| {fmt(r.get('kl'), r.get('kl_se'))} |")  # fmt: skip
    return "\n".join(lines)


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each peer against its resflow namesake: the NLL difference (resflow − peer, +- SE)
    on every data set where both trained."""
    out = []
    for data_name, res in results.items():
        rows = res["models"]
        for peer in PEERS:
            ours, theirs = rows.get(peer.namesake or ""), rows.get(peer.name)
            if not ours or not theirs or "nll" not in ours or "nll" not in theirs:
                continue
            diff = ours["nll"] - theirs["nll"]
            se = math.hypot(ours["nll_se"], theirs["nll_se"])
            out.append({"data": data_name, "resflow": peer.namesake, "peer": peer.name,
                        "difference": diff, "difference_se": se,
                        "resflow_ahead": diff < 0})  # fmt: skip
    return out


LIBRARY_COLOURS = {"resflow": "C0", "zuko": "C1", "normflows": "C2", "nflows": "C3"}


def plot(results: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 6), squeeze=False)
    for ax, (data_name, res) in zip(axes[0], results.items()):
        names = list(res["models"])
        rows = [res["models"][n] for n in names]
        nll = [r.get("nll", math.nan) for r in rows]
        se = [r.get("nll_se", 0.0) if math.isfinite(r.get("nll_se", math.nan)) else 0.0
              for r in rows]  # fmt: skip
        colours = [LIBRARY_COLOURS.get(r["library"], "C7") for r in rows]
        ax.barh(range(len(names)), nll, xerr=se, color=colours)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        finite = [v for v in nll if math.isfinite(v)]
        if res["entropy"] is not None:
            ax.axvline(res["entropy"], color="k", ls="--", lw=1, label="entropy")
            lo = res["entropy"] - 0.2
            hi = max([res["entropy"] + 0.3] + [v for v in finite if v < res["entropy"] + 2])
            ax.set_xlim(lo, hi + 0.05)
            ax.legend(loc="lower right")
        ax.set_xlabel("test NLL (nats)")
        ax.set_title(data_name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------
def load(name: str, repeat: int, n_test: int, data_dir: str | None) -> DataSplit:
    if name in TOY or name not in TABULAR:
        return load_data(name, n_train=N_TRAIN, n_test=n_test, seed=repeat)
    return load_data(name, data_dir=data_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=60.0,
                   help="CPU seconds per model, data set and repeat")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--datasets", nargs="+", default=[*TOY, *TABULAR])
    p.add_argument("--models", nargs="+", default=None, help="a subset (resflow and peer names)")
    p.add_argument("--data-dir", default=None, help="where the MAF archive is unpacked")
    p.add_argument("--no-conditional", action="store_true", help="skip the conditional toy")
    p.add_argument("--quick", action="store_true", help="0.3 CPU-s a model, 2,000 test points")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    budget = 0.3 if args.quick else args.budget
    n_test, n_samples = (2000, 1000) if args.quick else (10_000, 10_000)
    wanted = set(args.models) if args.models else None

    def keep(name: str) -> bool:
        return wanted is None or name in wanted

    missing = sorted({q.library for q in PEERS if not importable(q.library)})
    for lib in missing:
        print(f"skipped: {lib} is not importable (pip install resflow[peers])", flush=True)
    presets = {n: q for n, q in vector_families() if keep(n)}
    peers = [q for q in PEERS if keep(q.name) and q.library not in missing]
    print(f"{machine()}; {budget:g} CPU-s per model, data set and repeat", flush=True)
    for name, preset in presets.items():
        print(f"  {name}: preset {preset.name}, {get_preset(preset.name)}, its TrainConfig "
              f"(lr {preset.train.lr:g}, batch {preset.train.batch_size}, EMA)")  # fmt: skip
    for q in peers:
        print(f"  {q.name}: {q.settings}; Adam lr {PEER_LR:g}, batch {PEER_BATCH}")

    skipped: dict[str, str] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    warmed = False
    for repeat in range(args.repeats):
        for data_name in args.datasets:
            if data_name in skipped:
                continue
            try:
                data = load(data_name, repeat, n_test, args.data_dir)
            except (FileNotFoundError, ImportError) as err:
                why = str(err).splitlines()[0].split(". ")[0]
                skipped[data_name] = f"{why}: the MAF archive is not on this machine (--data-dir)"
                print(f"skipped {data_name}: {skipped[data_name]}", flush=True)
                continue
            if not warmed:
                warm_up(presets, peers, data)
                warmed = True
            seed = 1000 * repeat + 1
            jobs = density_jobs(presets, peers, data, budget, seed)
            for name, job in jobs:
                row = run_density(name, job, data, n_samples)
                runs.setdefault(data_name, {}).setdefault(name, []).append(row)
                what = (row["error"] if "error" in row else
                        f"NLL {row['nll']:.4f}  {row['steps']} steps  "
                        f"{row['samples_per_cpu_s']:,.0f} samples/CPU-s")  # fmt: skip
                print(f"[repeat {repeat}] {data_name:12s} {name:22s} {what}", flush=True)

    library = {q.name: q.library for q in PEERS} | dict.fromkeys(presets, "resflow")
    results: dict[str, Any] = {}
    for data_name, by_model in runs.items():
        entropy = toy_entropy(data_name) if data_name in TOY else None
        models = {n: {"library": library[n]} | summarize(rs, "nll") for n, rs in by_model.items()}
        results[data_name] = {"entropy": entropy, "models": models}

    conditional: dict[str, dict[str, Any]] = {}
    names = [n for n in CONDITIONAL if (n in presets or n in {q.name for q in peers})]
    if not args.no_conditional and names:
        cond_runs: dict[str, list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            for name in names:
                row = run_conditional(name, presets, budget, 1000 * repeat + 1, n_test)
                cond_runs.setdefault(name, []).append(row)
                what = row.get("error") or f"KL {row['kl']:.4f}  {row['steps']} steps"
                print(f"[repeat {repeat}] conditional  {name:22s} {what}", flush=True)
        conditional = {n: {"library": library[n]} | summarize(rs, "kl")
                       for n, rs in cond_runs.items()}  # fmt: skip

    versions = {lib: __import__(lib).__version__ for lib in ("zuko", "normflows")
                if lib not in missing}  # fmt: skip
    if "nflows" not in missing:
        from importlib.metadata import version

        versions["nflows"] = version("nflows")
    out = {
        "machine": machine(), "budget_cpu_s": budget, "repeats": args.repeats,
        "quick": args.quick, "n_test": n_test, "n_samples": n_samples, "versions": versions,
        "settings": {q.name: q.settings for q in peers}
        | {n: f"preset {q.name}" for n, q in presets.items()},
        "peer_training": {"optimizer": "Adam", "lr": PEER_LR, "batch": PEER_BATCH},
        "missing_libraries": missing, "skipped_datasets": skipped,
        "results": results, "comparisons": comparisons(results), "conditional": conditional,
        "runs": runs,
    }  # fmt: skip
    name = "peers_quick" if args.quick else "peers"
    path = save_json(name, out)
    if results:
        plot(results, OUT / f"{name}.png")
    print()
    for data_name, res in results.items():
        print(density_table(data_name, res["models"], res["entropy"]), end="\n\n")
    for c in out["comparisons"]:
        verdict = "ahead" if c["resflow_ahead"] else "behind"
        if abs(c["difference"]) < 2 * c["difference_se"]:
            verdict += " (within 2 SE)"
        print(f"{c['data']:12s} {c['resflow']:22s} vs {c['peer']:20s} {verdict}: "
              f"{c['difference']:+.3f} ± {c['difference_se']:.3f} nats")  # fmt: skip
    if conditional:
        print("\nconditional toy:\n" + conditional_table(conditional))
    for data_name, why in skipped.items():
        print(f"skipped {data_name}: {why}")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
