"""Data-parallel training across processes (``torchrun``), with PyTorch's own
:class:`~torch.nn.parallel.DistributedDataParallel`.

The :class:`~resflow.training.Trainer` uses it when it runs under ``torchrun`` (or in
a process group the caller initialised); one process trains as before. What keeps
``N`` processes equal to one process with the whole batch:

* **The batch.** ``batch_size`` is the examples of one optimizer step over all
  processes together. The global batch of a step is the one a single process would
  take (a permutation per epoch seeded by ``(seed, epoch)``); it is cut into
  ``update_freq`` micro-batches, and each micro-batch into ``world_size`` equal shards
  in rank order (:meth:`Distributed.shard`). A run therefore sees the same data with
  any number of processes, and resumes with another number.
* **The gradient.** The loss is computed inside the wrapped module's ``forward``
  (:class:`ObjectiveModule`: the objective, e.g. ``bits_per_dim``, called on the flow),
  so DDP's all-reduce averages every gradient path of the residual blocks: plain
  backprop, the closed-form Neumann gradients attached in the forward pass and the
  backward-in-forward autograd function. Micro-batches but the last skip the
  all-reduce (``no_sync``).
* **Data-dependent initialisation.** Any module with ``initialize(x)`` (ActNorm,
  ElementActNorm; and ``initialize_inverse``) is initialised on the inputs of all
  processes gathered in rank order (:func:`global_initialization`): the statistics of
  the global batch, as one process computes them.
* **Batch statistics.** A module with ``batch_statistics(x)`` (RealNVP's and MAF's
  :class:`~resflow.layers.batchnorm.BatchNormFlow`) takes its mean and variance over
  every process's shard, with their gradients (:func:`synchronize_batch_statistics`),
  so its running averages are those of the global batch.
* **Buffers.** After every optimizer step (after the Lipschitz refresh) the buffers
  of rank 0 are broadcast (:meth:`Distributed.broadcast_buffers`): power-iteration
  vectors, norm certificates, running averages are the same everywhere even where
  kernels are not bitwise reproducible. EMA weights follow identical parameters.
* **Randomness.** The model is initialised from the same seed everywhere; the random
  draws of training (dequantization noise, the roulette and Hutchinson draws of the
  log-det estimators) are independent per rank (:meth:`Distributed.reseed`), so the
  averaged gradient stays unbiased.

Only rank 0 writes (config, checkpoints, metrics, TensorBoard, samples); every rank
reads a checkpoint to resume, so several machines need the run folder on a shared
file system. Evaluation is sharded: each rank evaluates a contiguous slice of the
test set and the means and standard errors are combined (:func:`combine_results`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from resflow.data import DataConfig, DataSplit, load_data
from resflow.evaluation import EvalResult
from resflow.layers.hooks import BatchStatistics, DataInitialized, TransientState, implementers
from resflow.training.objectives import Batch, Metrics, Objective
from resflow.training.process_group import (
    Distributed,
    PeerError,
    comm_device,
    launched_by_torchrun,
    peer_failure,
    setup,
    shutdown,
)

__all__ = [
    "Distributed",
    "ObjectiveModule",
    "PeerError",
    "all_reduce",
    "combine_results",
    "global_initialization",
    "launched_by_torchrun",
    "load_shared",
    "no_sync",
    "peer_failure",
    "setup",
    "shard_range",
    "sharded",
    "shutdown",
    "synchronize_batch_statistics",
    "unused_parameters",
    "wrap",
]


def _gather(x: Tensor) -> Tensor:
    """``x`` of every rank, concatenated along the batch in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@contextmanager
def global_initialization(model: nn.Module, ctx: Distributed) -> Iterator[None]:
    """Within it, data-dependent initialisations (a module's ``initialize(x)`` /
    ``initialize_inverse(y)`` while its ``initialized`` flag is false) see the inputs of
    every rank gathered in rank order: ActNorm's statistics are the global batch's."""
    if not ctx.enabled:
        yield
        return
    patched: list[tuple[nn.Module, str]] = []
    for m in implementers(model, DataInitialized):
        if bool(m.initialized):
            continue
        names = ("initialize", "initialize_inverse")
        for name in (n for n in names if callable(getattr(type(m), n, None))):
            setattr(m, name, _on_gathered(getattr(m, name)))
            patched.append((m, name))
    try:
        yield
    finally:
        for m, name in patched:
            delattr(m, name)  # the class's method again


def _on_gathered(fn: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
    def initialize(x: Tensor) -> None:
        fn(_gather(x))

    return initialize


def synchronize_batch_statistics(model: nn.Module, ctx: Distributed) -> int:
    """Make every module with ``batch_statistics(x) -> (mean, var)`` take them over
    the shards of all ranks (equal shards: the mean of the ranks' means, then of their
    mean squared deviations from it), differentiably (the backward pass sums the
    gradients of every rank, as for SyncBatchNorm). Returns the modules changed."""
    if not ctx.enabled:
        return 0
    n = 0
    for m in implementers(model, BatchStatistics):
        if "batch_statistics" not in vars(m):  # not synchronized already
            m.batch_statistics = _synced_statistics(m, ctx.world_size)  # type: ignore[method-assign]
            n += 1
    return n


class _AllReduceSum(torch.autograd.Function):
    """``sum_r x_r`` on every rank; its backward sums the incoming gradients the same
    way (each rank's ``x_r`` influences every rank's loss)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.clone()
        dist.all_reduce(out)
        return out


def all_reduce(x: Tensor) -> Tensor:
    """The sum of ``x`` over the ranks, differentiable."""
    return _AllReduceSum.apply(x)  # type: ignore[no-any-return]


def _synced_statistics(m: nn.Module, world: int) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
        dims = [0, *range(2, x.dim())]
        mean = all_reduce(x.mean(dims)) / world
        centred = x - mean.view(1, -1, *([1] * (x.dim() - 2)))
        var = all_reduce(centred.pow(2).mean(dims)) / world
        return mean, var

    return batch_statistics


class ObjectiveModule(nn.Module):
    """The flow and its objective as one module, so that DDP's ``forward`` sees the
    whole loss computation (calling ``flow.log_prob`` on a wrapped flow would bypass
    DDP and its gradient all-reduce). Its only submodule is the flow: its
    ``state_dict`` keys are the flow's, prefixed ``flow.``."""

    def __init__(self, flow: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.flow = flow
        self.objective = objective

    def forward(
        self, x: Tensor, labels: Tensor | None, context: Tensor | None
    ) -> tuple[Tensor, Metrics]:
        return self.objective(self.flow, Batch(x, labels, context))  # type: ignore[arg-type]


def wrap(
    flow: nn.Module,
    objective: Objective,
    ctx: Distributed,
    device: torch.device,
    find_unused: bool = False,
) -> Any:
    """``DistributedDataParallel`` over :class:`ObjectiveModule` (parameters and
    buffers of rank 0 broadcast). ``find_unused``: some parameters get no gradient from
    the objective (:func:`unused_parameters`), so DDP must search for them each step."""
    from torch.nn.parallel import DistributedDataParallel

    module = ObjectiveModule(flow, objective)
    kwargs: dict[str, Any] = {}
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:  # buffers are broadcast after each step instead
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    ddp = DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
        **kwargs,
    )
    ctx.broadcast_parameters(flow)
    ctx.broadcast_buffers(flow)
    return ddp


def unused_parameters(flow: nn.Module, objective: Objective, batch: Batch) -> list[str]:
    """Names of the trainable parameters that one training step on ``batch`` leaves
    without a gradient (the model's buffers, gradients and random state are restored)."""
    buffers = [b.detach().clone() for b in flow.buffers()]
    transient = [(m, m.transient_state()) for m in implementers(flow, TransientState)]
    with torch.random.fork_rng():
        loss, _ = objective(flow, batch)  # type: ignore[arg-type]
        loss.backward()
    unused = [n for n, p in flow.named_parameters() if p.requires_grad and p.grad is None]
    for p in flow.parameters():
        p.grad = None
    with torch.no_grad():
        for b, saved in zip(flow.buffers(), buffers):
            b.copy_(saved)
    for m, state in transient:
        m.load_transient_state(state)
    return unused


def no_sync(ddp: Any, last: bool) -> AbstractContextManager[Any]:
    """DDP's ``no_sync`` for micro-batches before the last of an optimizer step."""
    return nullcontext() if last or ddp is None else ddp.no_sync()


def shard_range(n: int, ctx: Distributed) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous slice of ``n`` examples."""
    per, extra = divmod(n, ctx.world_size)
    start = ctx.rank * per + min(ctx.rank, extra)
    return start, start + per + (ctx.rank < extra)


def combine_results(result: EvalResult | None, ctx: Distributed) -> EvalResult:
    """The mean and standard error (and a hybrid model's accuracy) over all ranks'
    examples from each rank's :class:`EvalResult` (``None``: a rank without examples).
    Each rank's sum and sum of squares are recovered from its mean and standard error."""
    stats = torch.zeros(5, dtype=torch.float64)
    if result is not None:
        n = result.n
        ss = (result.stderr**2) * n * (n - 1) if n > 1 else 0.0
        acc = getattr(result, "accuracy", None)
        stats = torch.tensor(
            [n, result.mean * n, ss + n * result.mean**2, (acc or 0.0) * n, acc is not None],
            dtype=torch.float64,
        )
    if ctx.enabled:
        stats = stats.to(comm_device())
        dist.all_reduce(stats)
    n, total, squares, correct, with_acc = (float(v) for v in stats.cpu())
    mean = total / n
    var = max(squares - n * mean**2, 0.0) / (n - 1) if n > 1 else float("nan")
    stderr = (var / n) ** 0.5 if n > 1 else float("nan")
    ref = result if result is not None else EvalResult(0.0, 0.0, 0, "")
    unit, note = _agree(ref.unit, ref.note, ctx)
    out = EvalResult(mean, stderr, int(n), unit, note)
    if with_acc:
        out.accuracy = correct / n  # type: ignore[attr-defined]
    return out


def _agree(unit: str, note: str, ctx: Distributed) -> tuple[str, str]:
    if not ctx.enabled:
        return unit, note
    objs: list[Any] = [(unit, note)] if ctx.is_main else [None]
    dist.broadcast_object_list(objs, 0)
    return objs[0]


def sharded(evaluate: Callable[[int, int], EvalResult], n: int, ctx: Distributed) -> EvalResult:
    """``evaluate(start, stop)`` on this rank's slice of ``n`` examples, combined over
    the ranks. An error on any rank is raised on every rank (none waits forever)."""
    start, stop = shard_range(n, ctx)
    result: EvalResult | None = None
    error: BaseException | None = None
    try:
        if stop > start:
            result = evaluate(start, stop)
    except (FloatingPointError, ValueError, RuntimeError) as e:
        error = e
    if not ctx.all_true(error is None):
        if error is not None:
            raise error
        raise FloatingPointError("the evaluation failed on another process (see its message)")
    return combine_results(result, ctx)


SHARED_MEMORY = "/dev/shm"
"""Where :func:`load_shared` puts the one copy of a machine's data."""

_TENSORS = ("train", "test", "valid", "train_labels", "test_labels", "valid_labels",
            "train_context", "test_context", "valid_context")  # fmt: skip


def load_shared(config: DataConfig, ctx: Distributed) -> DataSplit:
    """:func:`~resflow.data.load_data`, but one copy of the tensors per machine instead
    of one per process: local rank 0 loads the data and writes its tensors to shared
    memory (``/dev/shm``); every process of the machine maps the same pages, and the
    files are unlinked once all have mapped them (the memory is freed when the last
    process exits). Without ``/dev/shm``, where it is too small, or with one process,
    every process loads its own copy. Every rank must call it."""
    if not ctx.enabled or not os.path.isdir(SHARED_MEMORY):
        return load_data(config)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    tag = f"resflow-{run}-{os.environ.get('MASTER_PORT', '0')}-"
    split: DataSplit | None = None
    meta: dict[str, Any] = {}
    error: Exception | None = None
    written = True
    if ctx.local_rank == 0:
        try:
            split = load_data(config)
        except Exception as e:  # raised below, once every rank knows
            error = e
        if split is not None:
            names = [f.name for f in dataclasses.fields(split) if f.name not in _TENSORS]
            meta["fields"] = {name: getattr(split, name) for name in names}
            try:
                for name in _TENSORS:
                    t = getattr(split, name)
                    if t is not None:
                        path = os.path.join(SHARED_MEMORY, tag + name)
                        meta[name] = (tuple(t.shape), t.dtype, path)
                        t.contiguous().numpy().tofile(path)
            except OSError:  # e.g. a small /dev/shm in a container
                written = False
    if not ctx.all_true(error is None):  # a machine could not load the data
        if error is not None:
            raise error
        raise PeerError("another machine could not load the data (see its message)")
    if not ctx.all_true(written):  # shared memory too small somewhere: a copy per process
        for value in meta.values():
            if isinstance(value, tuple) and os.path.exists(value[2]):
                os.unlink(value[2])
        return split if split is not None else load_data(config)
    box: list[Any] = [meta if ctx.is_main else None]
    dist.broadcast_object_list(box, 0)  # the same names, shapes and dtypes on every machine
    meta = dict(box[0])
    fields = meta.pop("fields")
    del split  # rank 0's private copy: from here on the shared one
    mapped = {name: _map(path, shape, dtype) for name, (shape, dtype, path) in meta.items()}
    dist.barrier()  # every process has mapped the files
    if ctx.local_rank == 0:
        for _, _, path in meta.values():
            os.unlink(path)
    return DataSplit(**fields, **{name: mapped.get(name) for name in _TENSORS})


def _map(path: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    n = math.prod(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(path, shared=True, size=n, dtype=dtype).view(shape)
