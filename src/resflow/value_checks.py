"""Checks of tensor values, read on the host at once or once per batch of steps.

A check of a value on the device (is the input finite? are these integer levels? is
the loss finite?) reads it on the host, and on a GPU every such read waits for the
device to finish its queue. :func:`require` raises its error at once, as a check
always did, except inside :func:`deferred`: there the flag stays on the device, and
:meth:`DeferredChecks.verify` reads all the flags noted since the last call together,
once, and raises the first failed check's error. The trainer defers its per-step
checks and verifies at every logged step, before it evaluates, samples or writes a
checkpoint, and when anything fails, so that a steady-state step reads nothing and
nothing non-finite is ever saved.

>>> import torch
>>> checks = DeferredChecks()
>>> with deferred(checks):
...     require(torch.tensor(False), lambda: ValueError("not raised"))
...     require(torch.tensor(True), lambda: ValueError("the second check failed"))
>>> len(checks)
2
>>> checks.verify()
Traceback (most recent call last):
...
ValueError: the second check failed
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

ErrorFactory = Callable[[], BaseException]


class DeferredChecks:
    """Failure flags kept on the device until :meth:`verify` reads them together."""

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, ErrorFactory]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, bad: Tensor, error: ErrorFactory) -> None:
        """Note the flag ``bad`` (a one-element boolean tensor) and the error it means."""
        self._pending.append((bad.detach().reshape(()), error))

    def clear(self) -> None:
        """Forget the noted flags without reading them."""
        self._pending.clear()

    def verify(self) -> None:
        """Read every flag noted since the last call (one read) and raise the error of
        the first one set; the flags are forgotten either way."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([bad.to(pending[0][0].device) for bad, _ in pending])
        if not bool(flags.any()):
            return
        first = int(flags.to(torch.uint8).argmax())  # a second read, on failure only
        raise pending[first][1]()


_active: DeferredChecks | None = None


@contextlib.contextmanager
def deferred(checks: DeferredChecks) -> Iterator[DeferredChecks]:
    """Inside the block, :func:`require` notes its flags in ``checks`` instead of
    reading them (``checks.verify()`` reads them)."""
    global _active
    previous, _active = _active, checks
    try:
        yield checks
    finally:
        _active = previous


def deferring() -> bool:
    """Whether checks are being deferred (inside :func:`deferred`)."""
    return _active is not None


def require(bad: Tensor, error: ErrorFactory) -> None:
    """Raise ``error()`` where the one-element boolean tensor ``bad`` is true: at once,
    or, inside :func:`deferred`, when the checks are verified. ``error`` builds the
    exception when it is raised, so its message may read values then."""
    if _active is None:
        if bool(bad):
            raise error()
    else:
        _active.add(bad, error)
