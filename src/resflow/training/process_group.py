"""This process's place in a multi-process run (``torchrun``): its rank, the process
group's setup and teardown, and the failures of its peers (see
:mod:`resflow.training.distributed`)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

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
        t = torch.tensor([0.0 if flag else 1.0], device=comm_device())
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def mean(self, value: Tensor) -> Tensor:
        """The mean of a scalar over the ranks."""
        if not self.enabled:
            return value
        t = value.detach().to(comm_device(), torch.float64).reshape(1).clone()
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


def comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast(tensors: list[Tensor]) -> None:
    device = comm_device()
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
