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
import datetime
import inspect
import math
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from resflow.data import DataConfig, DataSplit, load_data
from resflow.evaluation import EvalResult
from resflow.training.objectives import Batch, Objective

T = TypeVar("T")


class PeerError(RuntimeError):
    """Another process of the run failed (it reports why); this one stops too."""


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel run (one process: rank 0 of 1).

    Attributes:
        rank: this process's index among all processes (``RANK``).
        world_size: the number of processes (``WORLD_SIZE``).
        local_rank: its index on this machine (``LOCAL_RANK``; the GPU it uses).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda:LOCAL_RANK`` for ``--device cuda``."""
        if not self.enabled or device.type != "cuda":
            return device
        if device.index is not None and device.index != self.local_rank:
            raise ValueError(
                f"--device {device}: under torchrun each process uses the GPU of its "
                f"local rank (cuda:{self.local_rank}); pass --device cuda"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def check_batch(self, batch_size: int, update_freq: int) -> None:
        """A global batch must split into ``update_freq x world_size`` equal shards."""
        parts = update_freq * self.world_size
        if batch_size % parts:
            raise ValueError(
                f"--batch-size {batch_size} does not split into --update-freq {update_freq} "
                f"x {self.world_size} processes = {parts} equal parts; choose a multiple "
                f"of {parts}"
            )

    def shard(self, idx: Tensor, micro: int, update_freq: int) -> Tensor:
        """This rank's part of micro-batch ``micro`` of the global batch ``idx``."""
        m = len(idx) // (update_freq * self.world_size)
        start = (micro * self.world_size + self.rank) * m
        return idx[start : start + m]

    def first_shards(self, idx: Tensor, update_freq: int) -> Tensor:
        """All of this rank's shards of the global batch ``idx`` (for initialisation)."""
        return torch.cat([self.shard(idx, j, update_freq) for j in range(update_freq)])

    def reseed(self, seed: int, step: int) -> None:
        """Independent random draws per rank from here on (rank 0 keeps its stream, so
        one process runs exactly as without this module)."""
        if self.rank:
            torch.manual_seed((seed * 1_000_003 + step) * 65_537 + self.rank)

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only; the other ranks wait for it, and an error there is
        raised on every rank (:class:`PeerError` on the others), so none waits forever."""
        value: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                value = fn()
            except Exception as e:
                error = e
        if self.enabled:
            message: list[Any] = [None if error is None else str(error)]
            dist.broadcast_object_list(message, 0)
            if message[0] is not None and not self.is_main:
                raise PeerError(f"rank 0 failed: {message[0]}")
        if error is not None:
            raise error
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a failure on one is seen by all)."""
        if not self.enabled:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=_comm_device())
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a scalar over the ranks."""
        if not self.enabled:
            return value
        t = value.detach().to(_comm_device(), torch.float64).reshape(1).clone()
        dist.all_reduce(t)
        return (t / self.world_size).reshape(())

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy every buffer (and frozen parameter) of rank 0 to the other ranks, one
        flat broadcast per dtype."""
        if not self.enabled:
            return
        tensors = [b for b in model.buffers() if b.numel()]
        tensors += [p for p in model.parameters() if not p.requires_grad]
        _broadcast(tensors)

    @torch.no_grad()
    def broadcast_parameters(self, model: nn.Module) -> None:
        if self.enabled:
            _broadcast(list(model.parameters()))


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(tensors: list[Tensor]) -> None:
    device = _comm_device()
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for items in groups.values():
        flat = torch.cat([t.reshape(-1) for t in items]).to(device)
        dist.broadcast(flat, 0)
        offset = 0
        for t in items:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


_PEER_FAILURE_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
    "remote process exited",
    "communicator was aborted",
)


def peer_failure(error: BaseException) -> PeerError | None:
    """The one-line :class:`PeerError` for a collective of a multi-process run that
    failed because another process stopped (killed, crashed, preempted), else ``None``
    (gloo and NCCL raise a plain ``RuntimeError`` or a ``DistError`` with their own
    long report)."""
    if not isinstance(error, RuntimeError) or isinstance(error, PeerError):
        return None
    if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
        return None
    text = str(error)
    if dist.is_available() and isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
        return PeerError(
            f"the processes of this run could not connect ({first}); check torchrun's "
            "--master-addr / --master-port and that every process was started"
        )
    distributed_error = dist.is_available() and isinstance(error, dist.DistError)
    if not (distributed_error or any(sign in text for sign in _PEER_FAILURE_SIGNS)):
        return None
    return PeerError(
        "another process of this run stopped (it was killed or failed: see its own "
        "output), so this one stops too; start the launch again with --resume to continue "
        "from the last checkpoint"
    )


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process run (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> Distributed:
    """The data-parallel context of this process: an initialised process group (the
    caller's, or one created here from torchrun's environment: NCCL for a CUDA
    device, gloo otherwise), else one process."""
    if not dist.is_available():
        if launched_by_torchrun():
            raise ValueError("this torch build has no torch.distributed; run one process")
        return Distributed()
    if not dist.is_initialized():
        if not launched_by_torchrun():
            return Distributed()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    world = dist.get_world_size()
    if world == 1:
        return Distributed()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
    return Distributed(dist.get_rank(), world, local)


def shutdown(together: bool = False) -> None:
    """Destroy the process group that :func:`setup` (or the caller) initialised.

    ``together`` (a command that ended normally): first wait, at most a minute, until
    every process has ended too, so that no process tears its connections down while a
    peer still uses them (gloo can abort a process whose peer closes first)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if together and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:  # a peer that ended otherwise: nothing to wait for
            pass
    dist.destroy_process_group()


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
    for m in model.modules():
        flag = getattr(m, "initialized", None)
        if not isinstance(flag, Tensor) or bool(flag):
            continue
        for name in ("initialize", "initialize_inverse"):
            fn = getattr(m, name, None)
            if callable(fn):
                setattr(m, name, _on_gathered(fn))
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
    for m in model.modules():
        if callable(getattr(m, "batch_statistics", None)) and "batch_statistics" not in vars(m):
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
    ) -> tuple[Tensor, dict[str, float]]:
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
    transient = [(m, m.transient_state()) for m in flow.modules() if hasattr(m, "transient_state")]
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
        stats = stats.to(_comm_device())
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

_TENSORS = ("train", "test", "valid", "train_labels", "test_labels", "valid_labels")


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
