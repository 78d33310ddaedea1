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

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from resflow.allocator import keep_freed_memory
from resflow.config import replace
from resflow.data import DataConfig, DataSplit, load_data
from resflow.evaluation import EvalResult
from resflow.flow import Flow
from resflow.layers.base import after_optimizer_step
from resflow.layers.residual.kernels import set_compile
from resflow.models import build_model, recommended_training
from resflow.plots import plot_learning_curve
from resflow.runs import RunConfig, RunFolder, check_resume, prepare_folder
from resflow.train_config import TrainConfig
from resflow.training import distributed as ddp
from resflow.training.distributed import Distributed
from resflow.training.ema import EMA
from resflow.training.objectives import Batch, Metrics, Objective, default_objective
from resflow.training.optim import (
    batch_indices,
    make_optimizer,
    make_scheduler,
    precision_context,
)
from resflow.training.reporting import Reporting, _writer
from resflow.training.state import Checkpointing
from resflow.value_checks import DeferredChecks, deferred, require

__all__ = ["Trainer", "TrainResult", "batch_indices", "make_optimizer", "make_scheduler"]


@dataclass
class TrainResult:
    model: Flow
    ema: EMA
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    final: EvalResult | None = None


class Trainer(Checkpointing, Reporting):
    """Train a registered model on a data set, writing the run under ``out_dir``.

    Args:
        model_config: the config of any registered model (e.g. ``get_preset("toy2d")``).
        data: a :class:`DataSplit` or a :class:`DataConfig` to load (only a split that
            records its config -- as :func:`load_data` returns -- can be evaluated
            from the CLI later).
        config: training settings. ``None`` (default): the settings recommended with the
            preset the model config comes from (as ``resflow train --preset`` uses them;
            :func:`resflow.models.recommended_training`, recorded in
            :attr:`settings_from`); a mapping such as ``{"steps": 2000}``: those settings
            changed; a :class:`TrainConfig`: exactly these settings.
        out_dir: the run folder (:class:`resflow.runs.RunFolder`): ``config.yaml``,
            ``last.pt``, ``best.pt``, ``metrics.jsonl``, ``curve.png``, ``tb/``,
            ``samples/``.
        resume: continue from ``out_dir/last.pt`` when it exists.
        objective: what a step minimizes (default :class:`MaximumLikelihood`; a hybrid
            model: :class:`~resflow.training.objectives.Hybrid`).
        distributed: this process's place in a data-parallel run (default: from an
            initialised process group or torchrun's environment, else one process).

    Which weights: :attr:`model` holds the raw weights the optimizer trains;
    :meth:`evaluate`, :meth:`sample` and the checkpoints' ``best.pt`` use the EMA
    average (:attr:`ema`, as the papers evaluate), and so does
    :meth:`averaged_model`, a copy to keep; ``evaluate(weights="raw")`` and
    ``sample(..., weights="raw")`` use the raw ones.
    """

    def __init__(
        self,
        model_config: Any,
        data: DataSplit | DataConfig,
        config: TrainConfig | Mapping[str, Any] | None = None,
        out_dir: str | Path = "runs/run",
        resume: bool = False,
        objective: Objective | None = None,
        overwrite: bool = False,
        distributed: Distributed | None = None,
    ) -> None:
        recommended, self.settings_from = recommended_training(model_config)
        if config is None:
            config = recommended
        elif not isinstance(config, TrainConfig):  # changes to the recommended settings
            config = replace(recommended, **dict(config))
        else:
            self.settings_from = None  # the caller's own settings, whole
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
        self._autocast = precision_context(config.precision, self.device)
        self.dist.check_batch(config.batch_size, config.update_freq)
        self._ddp: Any = None  # the DistributedDataParallel wrapper, once initialised
        _check_data(data, config)
        self.restarted = False  # a run stopped before its first checkpoint, started again
        self._lock()
        try:
            self.restarted = bool(
                self.dist.on_main(
                    lambda: prepare_folder(
                        self.run, resume, overwrite, model_config, data.config, config
                    )
                )
            )
            torch.manual_seed(config.seed)
            self.model = build_model(model_config).to(self.device)
            self.objective = objective or default_objective(self.model)
            if data.levels is not None and self.model.levels != data.levels:
                raise ValueError(
                    f"the data have {data.levels} levels but the model expects {self.model.levels}"
                )
            _check_labels(self.model, data)
            if self.model.context_features != data.context_features:
                raise ValueError(
                    f"the model takes a context of {self.model.context_features} feature(s), "
                    f"the data have {data.context_features} context column(s): set the "
                    f"model config's context_features={data.context_features}"
                )
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
                check_resume(self.run, data.config, config)
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

    def _init_lazy_state(self) -> None:
        """ActNorm initialisation and conv norm buffers from the first batch, then EMA."""
        if self.ema is not None:
            return
        idx = batch_indices(len(self.data.train), self.cfg.batch_size, 0, self.cfg.seed)
        if self.dist.enabled:  # this rank's shards; statistics over all ranks' shards
            idx = self.dist.first_shards(idx, self.cfg.update_freq)
            ddp.synchronize_batch_statistics(self.model, self.dist)
        batch = self._batch(idx)
        with torch.random.fork_rng(), ddp.global_initialization(self.model, self.dist):
            self.model.train()
            _init_forward(self.model, batch)
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
        # the step's value checks (inputs, loss, gradient norm) stay on the device and are
        # read together at the steps that log, evaluate, sample or save, and on any error
        checks = DeferredChecks()
        try:
            while self.step < until and not self.stopped_early:
                idx = batch_indices(len(self.data.train), cfg.batch_size, self.step, cfg.seed)
                with deferred(checks):
                    loss, extra = self._forward_backward(idx)
                    gnorm = torch.nn.utils.clip_grad_norm_(  # the norm only, with grad_clip 0
                        self.model.parameters(), cfg.grad_clip or math.inf, foreach=self._foreach
                    )
                    self._require_finite(gnorm, "the gradient norm")
                self.opt.step()
                self.sched.step()
                after_optimizer_step(self.model)
                self.dist.broadcast_buffers(self.model)
                self.ema.update(self.model)
                self.step += 1
                seen += 1
                bar.update(1)
                logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
                evaluated = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                sampling = bool(cfg.sample_every) and self.step % cfg.sample_every == 0
                saving = self.step % cfg.checkpoint_every == 0
                if logged or evaluated or sampling or saving or len(checks) >= 256:
                    checks.verify()
                rec: dict[str, Any] = {}
                if logged or evaluated:
                    rec = {"step": self.step, "loss": float(loss.detach())}
                    rec.update({k: float(v) for k, v in extra.items()})
                if logged:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix({unit: f"{rec['loss']:.4f}", "it/s": f"{rate:.2f}"})
                    rec.update(lr=self.sched.get_last_lr()[0], grad_norm=float(gnorm), it_s=rate)
                    if writer is not None:
                        for k in ("loss", "lr", "grad_norm", "it_s"):
                            writer.add_scalar(f"train/{k}", rec[k], self.step)
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
                if main and sampling and self.model.levels:
                    self._save_samples(writer)
                if (
                    self.step % cfg.checkpoint_every == 0
                    or self.step == cfg.steps
                    or self.stopped_early
                ):
                    self._save(self.run.last)
            checks.verify()  # the steps since the last logged one
        except Exception:
            checks.verify()  # a step that diverged explains what failed after it
            raise
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
        return TrainResult(self.model, self.ema, self.step, self.history, self._final_result(final))

    def _forward_backward(self, idx: Tensor) -> tuple[Tensor, Metrics]:
        """The loss of the global batch ``idx`` and its gradient in ``.grad``: one pass
        (one process), else ``update_freq`` micro-batches of this rank's shards, their
        gradients averaged over micro-batches and (by DDP) over the ranks."""
        if self._ddp is None and self.cfg.update_freq == 1:
            with self._autocast():
                loss, extra = self.objective(self.model, self._batch(idx))
            self._require_finite(loss, "the training loss")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss, extra
        k = self.cfg.update_freq
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        extra: Metrics = {}
        for j in range(k):
            batch = self._batch(self.dist.shard(idx, j, k))
            with ddp.no_sync(self._ddp, last=j == k - 1):
                if self._ddp is not None:
                    with self._autocast():
                        loss, extra = self._ddp(batch.x, batch.labels, batch.context)
                else:
                    with self._autocast():
                        loss, extra = self.objective(self.model, batch)
                    self._require_finite(loss, "the training loss")
                (loss / k).backward()
            total += loss.detach()
        mean = self.dist.mean(total / k)  # the loss of the global batch, on every rank
        self._require_finite(mean, "the training loss")
        return mean, extra

    def _require_finite(self, value: Tensor, what: str) -> None:
        """Fail, naming this step, where ``value`` is not finite (read at once, or with
        the step's other checks, see :mod:`resflow.value_checks`)."""
        step, value = self.step, value.detach()
        require(
            ~torch.isfinite(value),
            lambda: self._divergence(f"{what} became {float(value)}", step),
        )

    def _labels(self, labels: Tensor | None, idx: Tensor) -> Tensor | None:
        return None if labels is None else labels[idx].to(self.device)

    def _batch(self, idx: Tensor) -> Batch:
        return Batch(
            self.data.train[idx].to(self.device),
            self._labels(self.data.train_labels, idx),
            self._labels(self.data.train_context, idx),
        )


def _init_forward(model: Flow, batch: Batch) -> None:
    """One forward pass in train mode without gradients: ActNorm data-dependent init
    and lazily shaped power-iteration buffers."""
    with torch.no_grad():
        model(batch.x, batch.labels if model.n_classes else batch.context)


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
