"""The training loop, for every registered model and objective, with exact resume.

One loop serves vectors, 2-D toy data and images (paper setup, Appendix E): AdamW
(weight decay applied outside the adaptive update), linear warm-up, gradient-norm
clipping, the model's ``after_optimizer_step`` hooks (e.g. a Lipschitz refresh) after
every step, EMA weights for evaluation and
sampling, atomic ``last.pt`` / ``best.pt`` checkpoints and TensorBoard logs. With
validation data the best checkpoint is the one with the best validation score, and
``patience`` stops the run early once that score has not improved for that many
evaluations (the test score reported is then the best checkpoint's). A
checkpoint holds the model, optimizer, scheduler, EMA and RNG states and the step, and
the data order is a function of ``(seed, epoch)``, so a resumed run continues exactly
as an uninterrupted one would. Under ``torchrun`` the same loop trains data-parallel
(:mod:`resflow.training.distributed`); ``update_freq`` accumulates micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from resflow.allocator import keep_freed_memory
from resflow.checkpoint import FORMAT as CHECKPOINT_FORMAT
from resflow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resflow.config import to_dict
from resflow.data import DataConfig, DataSplit, load_data
from resflow.evaluation import (
    EvalResult,
    decode,
    density_note,
    evaluate,
    image_grid,
    save_image_grid,
)
from resflow.flow import Flow
from resflow.io import atomic_write_text
from resflow.layers.base import after_optimizer_step, preserved_transient_state
from resflow.layers.residual.kernels import set_compile
from resflow.models import build_model, config_from_dict, config_to_dict
from resflow.plots import plot_learning_curve
from resflow.runs import RunConfig, RunExistsError, RunFolder
from resflow.train_config import TrainConfig
from resflow.training import distributed as ddp
from resflow.training.distributed import Distributed
from resflow.training.ema import EMA
from resflow.training.objectives import Batch, Objective, default_objective


@dataclass
class TrainResult:
    model: Flow
    ema: EMA
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    final: EvalResult | None = None


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW: the decay ``lr * wd * w`` is applied to every trainable weight directly,
    outside Adam's adaptive update (the paper's intended optimizer). Torch's fused
    kernel updates all parameters at once where it exists (CPU and CUDA): on a model of
    many small layers the per-parameter loop costs more than the arithmetic."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=fused or None)  # fmt: skip


def _precision(precision: str, device: torch.device) -> Callable[[], Any]:
    """The context of a training forward pass at ``precision`` (see
    ``TrainConfig.precision``); a clear error where the device lacks it."""
    if precision == "tf32":
        if device.type != "cuda":
            raise ValueError(
                f"--precision tf32 needs a CUDA device (TensorFloat-32 is an NVIDIA matrix "
                f"mode); this run is on {device.type}"
            )
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision != "bf16":
        return contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bfloat16 arithmetic; use fp32")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--precision bf16 needs a CPU or CUDA device, not {device.type}")
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def make_scheduler(opt: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: ``lr * min((step + 1) / warmup, 1)``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(warmup, 1), 1.0))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of the batch at ``step``: epoch-wise permutations seeded by ``(seed, epoch)``."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return perm[i * batch_size : (i + 1) * batch_size]


class Trainer:
    """Train a registered model on a data set, writing the run under ``out_dir``.

    Args:
        model_config: the config of any registered model (e.g. ``get_preset("toy2d")``).
        data: a :class:`DataSplit` or a :class:`DataConfig` to load (only a split that
            records its config -- as :func:`load_data` returns -- can be evaluated
            from the CLI later).
        config: training settings.
        out_dir: the run folder (:class:`resflow.runs.RunFolder`): ``config.yaml``,
            ``last.pt``, ``best.pt``, ``metrics.jsonl``, ``curve.png``, ``tb/``,
            ``samples/``.
        resume: continue from ``out_dir/last.pt`` when it exists.
        objective: what a step minimizes (default :class:`MaximumLikelihood`; a hybrid
            model: :class:`~resflow.training.objectives.Hybrid`).
        distributed: this process's place in a data-parallel run (default: from an
            initialised process group or torchrun's environment, else one process).
    """

    def __init__(
        self,
        model_config: Any,
        data: DataSplit | DataConfig,
        config: TrainConfig | None = None,
        out_dir: str | Path = "runs/run",
        resume: bool = False,
        objective: Objective | None = None,
        overwrite: bool = False,
        distributed: Distributed | None = None,
    ) -> None:
        config = config or TrainConfig()
        self.model_config = model_config
        self.data = data if isinstance(data, DataSplit) else load_data(data)
        data = self.data
        self.cfg = config
        keep_freed_memory()  # large tensors reused, not faulted in anew (resflow.allocator)
        if config.compile:  # process-wide: every residual block fuses its kernels
            set_compile(True)
        self.run = RunFolder(out_dir)
        self.out = self.run.path
        self.device = _device(config.device)
        self.dist = distributed if distributed is not None else ddp.setup(self.device)
        self.device = self.dist.device(self.device)
        self._foreach = self.device.type in ("cpu", "cuda") or None  # one clipping kernel
        self._autocast = _precision(config.precision, self.device)
        self.dist.check_batch(config.batch_size, config.update_freq)
        self._ddp: Any = None  # the DistributedDataParallel wrapper, once initialised
        _check_data(data, config)
        self.restarted = False  # a run stopped before its first checkpoint, started again
        self._lock()
        try:
            self.dist.on_main(lambda: self._prepare_folder(resume, overwrite))
            torch.manual_seed(config.seed)
            self.model = build_model(model_config).to(self.device)
            self.objective = objective or default_objective(self.model)
            if data.levels is not None and self.model.levels != data.levels:
                raise ValueError(
                    f"the data have {data.levels} levels but the model expects {self.model.levels}"
                )
            _check_labels(self.model, data)
            if tuple(data.train.shape[1:]) != self.model.shape:
                raise ValueError(
                    f"data shape {tuple(data.train.shape[1:])} does not match the model's "
                    f"{self.model.shape}"
                )
            self.opt = make_optimizer(self.model, config)
            self.sched = make_scheduler(self.opt, config.warmup)
            self.step = 0
            self.saved_step: int | None = None
            self.best = math.inf
            self.best_step = 0
            self.stale = 0  # evaluations since the best one
            self.stopped_early = False
            self.history: list[dict[str, float]] = []
            self.ema: EMA | None = None
            if resume:
                self._check_resume()
                if self.run.last.exists():  # else stopped before its first checkpoint
                    self._load(self.run.last)
            if self.dist.is_main:
                self.run.write_config(RunConfig(model_config, data.config, config))
        finally:
            self._unlock()

    def _lock(self) -> None:
        if self.dist.is_main:  # rank 0 writes the run; the others only read it
            self.run.lock()

    def _unlock(self) -> None:
        if self.dist.is_main:
            self.run.unlock()

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        self.run.clean_temporary_files()
        if resume:
            if self.run.stopped_before_first_checkpoint():  # resumed at step 0
                self._check_resume()  # before anything is removed
                self.restarted = True
                self.run.clear(keep=("config.yaml",))
            elif not self.run.last.exists():
                raise RunExistsError(
                    f"nothing to resume: {self.run.last} does not exist (train without "
                    "--resume to start a new run)"
                )
        elif self.run.has_run() and not overwrite:
            if not self.run.stopped_before_first_checkpoint():
                raise RunExistsError(
                    f"{self.out} already holds a run; pass --resume to continue it or "
                    "--overwrite to replace it (or choose another --out)"
                )
            changed = self._changed_since_recorded()
            if changed:
                raise RunExistsError(
                    f"{self.out} holds a run stopped before its first checkpoint, with other "
                    f"settings ({changed}); pass --resume to start it again with its recorded "
                    "settings, or --overwrite to start it with these"
                )
            self.restarted = True
            self.run.clear()
        elif self.run.has_run():
            self.run.clear()

    def _changed_since_recorded(self) -> str:
        """What differs between the run recorded in the folder and this one ("" if
        nothing that changes the result)."""
        try:
            recorded = self.run.read_config()
        except CheckpointError:
            return "an unreadable config.yaml"
        if type(recorded.model) is not type(self.model_config):
            return "another model"
        changes = [_diff(recorded.model, self.model_config)]
        if self.data.config is not None and recorded.data != self.data.config.resolved():
            changes.append(
                "other data" if recorded.data is None
                else _diff(recorded.data, self.data.config.resolved())
            )  # fmt: skip
        changes.append(_diff(recorded.train, self.cfg, ignore=RESUMABLE_CHANGES))
        return ", ".join(c for c in changes if c)

    def _check_resume(self) -> None:
        """The data and settings of a resumed run must be those it was trained with
        (only the length of the run and how it reports may change)."""
        try:
            recorded = self.run.read_config()
        except CheckpointError:
            return  # no readable config.yaml: the checkpoint's own records decide
        if (
            recorded.data is not None
            and self.data.config is not None
            and recorded.data != self.data.config.resolved()
        ):
            raise ValueError(
                f"--resume: {self.out} was trained on other data ({recorded.data.name}, "
                f"{_diff(recorded.data, self.data.config.resolved())}); resume with the same "
                "data or start a new run"
            )
        changed = _diff(recorded.train, self.cfg, ignore=RESUMABLE_CHANGES)
        if changed:
            raise ValueError(
                f"--resume: {self.out} was trained with {changed}; resume with the same "
                "settings or start a new run"
            )

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.ema is not None
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "model_config": to_dict(config_to_dict(self.model_config)),
            "train_config": to_dict(self.cfg),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict(),
            "step": self.step,
            "best": self.best,
            "best_step": self.best_step,
            "stale": self.stale,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": {"name": self.data.name, "levels": self.data.levels},
        }

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{path} cannot be resumed: it lacks {', '.join(missing)}")
        saved = config_from_dict(state["model_config"])
        if saved != self.model_config:
            raise ValueError(
                f"{path} was trained with a different model config; use another out_dir "
                "or the same preset/options"
            )
        self._init_lazy_state()  # create lazily-shaped buffers before loading
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit its model config ({first})") from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        assert self.ema is not None
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.best = float(state["best"])
        self.best_step = int(state.get("best_step", 0))
        self.stale = int(state.get("stale", 0))
        self.stopped_early = bool(state.get("stopped_early", False))
        self.history = list(state["history"])
        self.saved_step = self.step
        torch.set_rng_state(state["rng"].cpu())
        cuda_rng = state.get("cuda_rng") or []
        if cuda_rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda_rng])
        self.dist.reseed(self.cfg.seed, self.step)

    def _init_lazy_state(self) -> None:
        """ActNorm initialisation and conv norm buffers from the first batch, then EMA."""
        if self.ema is not None:
            return
        idx = batch_indices(len(self.data.train), self.cfg.batch_size, 0, self.cfg.seed)
        if self.dist.enabled:  # this rank's shards; statistics over all ranks' shards
            idx = self.dist.first_shards(idx, self.cfg.update_freq)
            ddp.synchronize_batch_statistics(self.model, self.dist)
        x = self.data.train[idx].to(self.device)
        labels = self._labels(self.data.train_labels, idx)
        with torch.random.fork_rng(), ddp.global_initialization(self.model, self.dist):
            self.model.train()
            _init_forward(self.model, x, labels)
        self.ema = EMA(self.model, self.cfg.ema_decay)
        if self.dist.enabled:
            self._distribute(idx)

    def _distribute(self, idx: Tensor) -> None:
        """Wrap the model in DistributedDataParallel (see :mod:`resflow.training.distributed`)."""
        probe = self._batch(idx[: min(2, len(idx))])
        unused = ddp.unused_parameters(self.model, self.objective, probe)
        find_unused = not self.dist.all_true(not unused)
        self._ddp = ddp.wrap(self.model, self.objective, self.dist, self.device, find_unused)
        self.dist.reseed(self.cfg.seed, self.step)

    # ---- loop --------------------------------------------------------------------------
    def evaluate(
        self, max_examples: int | None = None, progress: bool = False, split: str = "test"
    ) -> EvalResult:
        """Test (or ``split="valid"``: validation) metric with the EMA weights (20 exact
        terms + unbiased tail by default)."""
        self._init_lazy_state()
        assert self.ema is not None
        if split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
        data = self.data.test if split == "test" else self.data.valid
        if data is None:
            raise ValueError("the data have no validation split (set n_valid)")
        test = data if max_examples is None else data[:max_examples]
        uses_labels = self.model.n_classes or hasattr(self.model, "n_labels")  # hybrid: accuracy
        labels = getattr(self.data, f"{split}_labels") if uses_labels else None
        if labels is not None:
            labels = labels[: len(test)]
        with torch.random.fork_rng(), preserved_transient_state(self.model):
            torch.manual_seed(self.cfg.seed + 17 + 1009 * self.dist.rank)
            with self.ema.swapped(self.model):
                if self.dist.enabled:  # each rank a slice, the results combined
                    result = ddp.sharded(
                        lambda a, b: evaluate(
                            self.model,
                            test[a:b],
                            self.cfg.eval_batch_size,
                            progress=progress and self.dist.is_main,
                            labels=None if labels is None else labels[a:b],
                        ),
                        len(test),
                        self.dist,
                    )
                else:
                    result = evaluate(
                        self.model, test, self.cfg.eval_batch_size, progress=progress, labels=labels
                    )
        return result

    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        denoise: bool = False,
        guidance: float | None = None,
    ) -> Tensor:
        """``n`` samples from the EMA model (a class-conditional model: classes
        ``0, 1, ..., K-1, 0, ...`` in turn). ``denoise`` (a model trained with noise
        augmentation) and ``guidance`` (a class-conditional one) are those of
        :func:`resflow.evaluation.decode`."""
        self._init_lazy_state()
        assert self.ema is not None
        k = self.model.n_classes
        labels = torch.arange(n, device=self.device) % k if k else None
        with torch.random.fork_rng(), preserved_transient_state(self.model):
            torch.manual_seed(self.cfg.seed + 29)
            with self.ema.swapped(self.model):
                self.model.eval()
                after_optimizer_step(self.model)
                z = self.model.sample_latent(n, temperature, labels)
                out = decode(self.model, z, labels, denoise, guidance)
                self.model.train()
        return out

    def fit(self, until: int | None = None) -> TrainResult:
        """Train up to step ``until`` (default ``config.steps``, the end of the run, where
        the model is evaluated and the learning curve plotted). The run folder is locked
        meanwhile (a second writer gets a clear error)."""
        self._lock()
        try:
            return self._fit(until)
        finally:
            self._unlock()

    def _fit(self, until: int | None) -> TrainResult:
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        self._init_lazy_state()
        assert self.ema is not None
        main = self.dist.is_main
        writer = _writer(self.out / "tb") if cfg.tensorboard and main else None
        self.model.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and main),
            desc="train",
            dynamic_ncols=True,
        )
        t0, seen = time.perf_counter(), 0
        unit = self.objective.unit
        validate = self.data.valid is not None and len(self.data.valid) > 0
        try:
            while self.step < until and not self.stopped_early:
                idx = batch_indices(len(self.data.train), cfg.batch_size, self.step, cfg.seed)
                loss, extra = self._forward_backward(idx)
                gnorm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), cfg.grad_clip, foreach=self._foreach
                )
                if not torch.isfinite(gnorm):
                    self._diverged(f"the gradient norm became {float(gnorm)}")
                self.opt.step()
                self.sched.step()
                after_optimizer_step(self.model)
                self.dist.broadcast_buffers(self.model)
                self.ema.update(self.model)
                self.step += 1
                seen += 1
                bar.update(1)
                rec: dict[str, float] = {"step": self.step, "loss": float(loss.detach()), **extra}
                logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if logged:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix({unit: f"{rec['loss']:.4f}", "it/s": f"{rate:.2f}"})
                    rec.update(lr=self.sched.get_last_lr()[0], grad_norm=float(gnorm), it_s=rate)
                    if writer is not None:
                        for k in ("loss", "lr", "grad_norm", "it_s"):
                            writer.add_scalar(f"train/{k}", rec[k], self.step)
                evaluated = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                if evaluated:
                    res = self.evaluate(cfg.eval_max)
                    rec.update(test=res.mean, test_stderr=res.stderr)
                    if res.extra:  # labelled second figures (i-ResNet's biased one)
                        rec["test_extra"] = {k: [r.mean, r.stderr] for k, r in res.extra.items()}
                    if res.accuracy is not None:
                        rec["test_accuracy"] = res.accuracy
                    line = f"step {self.step}: test {res}"
                    if validate:
                        val = self.evaluate(cfg.eval_max, split="valid")
                        rec.update(valid=val.mean, valid_stderr=val.stderr)
                        line += f", validation {val}"
                    if main:
                        bar.write(line)
                    if writer is not None:
                        writer.add_scalar(f"test/{unit}", res.mean, self.step)
                        if validate:
                            writer.add_scalar(f"valid/{unit}", rec["valid"], self.step)
                if logged or evaluated:  # checkpoints keep these records, not every step's
                    self.history.append(rec)
                if evaluated:
                    score = rec["valid"] if validate else rec["test"]
                    if score < self.best:
                        self.best, self.best_step, self.stale = score, self.step, 0
                        self._save(self.run.best)
                    else:
                        self.stale += 1
                    if cfg.patience and validate and self.stale >= cfg.patience:
                        self.stopped_early = True
                        if main:
                            bar.write(
                                f"stopping early at step {self.step}: no better validation "
                                f"score in {self.stale} evaluations (best {self.best:.4f} at "
                                f"step {self.best_step}, whose weights are kept)"
                            )
                if (
                    main
                    and cfg.sample_every
                    and self.step % cfg.sample_every == 0
                    and self.model.levels
                ):
                    self._save_samples(writer)
                if (
                    self.step % cfg.checkpoint_every == 0
                    or self.step == cfg.steps
                    or self.stopped_early
                ):
                    self._save(self.run.last)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if (self.step == cfg.steps or self.stopped_early) and main:
            plot_learning_curve(self.history, self.out / "curve.png", unit)
        final = next((h for h in reversed(self.history) if "test" in h), None)
        if self.stopped_early:
            self._restore_best()
            final = next(h for h in self.history if h["step"] == self.best_step and "test" in h)
        result = None
        if final is not None and (final["step"] == self.step or self.stopped_early):
            n = len(self.data.test)
            n = n if cfg.eval_max is None else min(cfg.eval_max, n)
            unit, note = _eval_unit(self.model), density_note(self.model)
            result = EvalResult(final["test"], final["test_stderr"], n, unit, note,
                                final.get("test_accuracy"))  # fmt: skip
            for label, (mean, stderr) in final.get("test_extra", {}).items():
                result.extra[label] = EvalResult(mean, stderr, n, unit)
        return TrainResult(self.model, self.ema, self.step, self.history, result)

    def _restore_best(self) -> None:
        """Load the weights (and EMA) of ``best.pt``: an early-stopped run ends there."""
        self.dist.barrier()  # rank 0 has written it
        state = load_checkpoint(self.run.best, map_location=self.device)
        self.model.load_state_dict(state["model"])
        assert self.ema is not None
        self.ema.load_state_dict(state["ema"])

    def _save(self, path: Path) -> None:
        """Write a checkpoint (and the metrics it matches) -- never non-finite weights."""
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self._diverged(f"the weights became non-finite ({bad[0]})")
        if not self.dist.is_main:  # the same state as rank 0's, which writes it
            self.saved_step = self.step if path == self.run.last else self.saved_step
            return
        save_checkpoint(self.state_dict(), path)
        if path == self.run.last:
            self.saved_step = self.step
            lines = "".join(json.dumps(h) + "\n" for h in self.history)
            atomic_write_text(self.run.metrics, lines)

    def _diverged(self, what: str) -> None:
        if self.saved_step is None:
            where = "no checkpoint was written yet"
        else:
            where = f"{self.run.last} holds the last finite state (step {self.saved_step})"
        raise FloatingPointError(
            f"{what} at step {self.step}; nothing non-finite was saved: {where}. Lower the "
            "learning rate (--lr) or check the data"
        )

    def _forward_backward(self, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The loss of the global batch ``idx`` and its gradient in ``.grad``: one pass
        (one process), else ``update_freq`` micro-batches of this rank's shards, their
        gradients averaged over micro-batches and (by DDP) over the ranks."""
        if self._ddp is None and self.cfg.update_freq == 1:
            with self._autocast():
                loss, extra = self.objective(self.model, self._batch(idx))
            if not torch.isfinite(loss):
                self._diverged(f"the training loss became {float(loss.detach())}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss, extra
        k = self.cfg.update_freq
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: dict[str, float] = {}
        for j in range(k):
            batch = self._batch(self.dist.shard(idx, j, k))
            with ddp.no_sync(self._ddp, last=j == k - 1):
                if self._ddp is not None:
                    with self._autocast():
                        loss, extra = self._ddp(batch.x, batch.labels, batch.context)
                else:
                    with self._autocast():
                        loss, extra = self.objective(self.model, batch)
                    if not torch.isfinite(loss):
                        self._diverged(f"the training loss became {float(loss.detach())}")
                (loss / k).backward()
            total += loss.detach()
        mean = self.dist.mean(total / k)  # the loss of the global batch, on every rank
        if not torch.isfinite(mean):
            self._diverged(f"the training loss became {float(mean)}")
        return mean, extra

    def _labels(self, labels: Tensor | None, idx: Tensor) -> Tensor | None:
        return None if labels is None else labels[idx].to(self.device)

    def _batch(self, idx: Tensor) -> Batch:
        return Batch(
            self.data.train[idx].to(self.device), self._labels(self.data.train_labels, idx)
        )

    def _save_samples(self, writer: Any) -> None:
        levels = self.model.levels or 256
        imgs = self.sample(self.cfg.n_samples)
        save_image_grid(imgs, self.out / "samples" / f"step{self.step:07d}.png", levels)
        if writer is not None:
            grid = image_grid(imgs, levels)
            fmt = "HW" if grid.ndim == 2 else "HWC"
            writer.add_image("samples", grid, self.step, dataformats=fmt)


def _init_forward(model: Flow, x: Tensor, labels: Tensor | None) -> None:
    """One forward pass in train mode without gradients: ActNorm data-dependent init
    and lazily shaped power-iteration buffers."""
    with torch.no_grad():
        model(x, labels if model.n_classes else None)


def _check_labels(model: Flow, data: DataSplit) -> None:
    """A class-conditional model needs labelled training and test data within its classes."""
    k = model.n_classes
    if not k:
        return
    if data.train_labels is None or data.test_labels is None:
        raise ValueError(
            f"the model is class-conditional ({k} classes) but the data set {data.name!r} "
            "has no labels"
        )
    top = max(int(data.train_labels.max()), int(data.test_labels.max())) + 1
    if top > k:
        raise ValueError(f"the data have {top} classes but the model was built for {k}")


def _writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep training usable without it
        return None
    return SummaryWriter(str(path))


RESUMABLE_CHANGES = (
    "steps", "eval_every", "eval_batch_size", "eval_max", "checkpoint_every", "sample_every",
    "n_samples", "log_every", "device", "tensorboard", "progress", "patience", "update_freq",
    "compile",
)  # fmt: skip
"""Training settings a resumed run may change (the others would change its result)."""
RESUME_KEYS = ("model", "model_config", "optimizer", "scheduler", "ema", "step", "best",
               "history", "rng")  # fmt: skip


def _diff(old: Any, new: Any, ignore: tuple[str, ...] = ()) -> str:
    """``"lr=0.001 (now 0.01), ..."`` for the fields of two dataclasses that differ."""
    parts = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name not in ignore and a != b:
            parts.append(f"{f.name}={a} (now {b})")
    return ", ".join(parts)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return device


def _check_data(data: DataSplit, cfg: TrainConfig) -> None:
    """Problems that would otherwise appear only after training."""
    if len(data.train) < cfg.batch_size:
        raise ValueError(
            f"{len(data.train)} training examples are fewer than the batch size "
            f"(--batch-size {cfg.batch_size})"
        )
    if len(data.test) == 0:
        raise ValueError("the test set is empty: nothing to evaluate the model on")
    if cfg.patience and (data.valid is None or len(data.valid) == 0):
        raise ValueError(
            f"--patience {cfg.patience} stops on the validation score, but the data have no "
            "validation split (hold some training examples out with --n-valid)"
        )
    if tuple(data.test.shape[1:]) != tuple(data.train.shape[1:]):
        raise ValueError(
            f"training examples have shape {tuple(data.train.shape[1:])} but test examples "
            f"{tuple(data.test.shape[1:])}"
        )


def _eval_unit(model: Flow) -> str:
    return "bits/dim" if model.levels is not None else "nats"
