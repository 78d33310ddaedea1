"""Elementwise kernels of the residual branch, optionally fused by ``torch.compile``.

The derivative chains of a residual branch (``a(z)``, ``a'(z)``, ``a''(z)`` over every
hidden activation) are memory-bound: run op by op, each is a dozen passes over tensors
of ``batch x 512 x H x W``. With compilation on (:func:`set_compile`, the environment
variable ``RESFLOW_COMPILE=1`` or ``resflow train --compile``) each chain becomes one
fused kernel on CPU and GPU. The first call per shape compiles (tens of seconds on a
CPU); if compilation fails -- no C++ compiler, an unsupported platform -- a warning is
given once and the op-by-op version is used from then on, with identical results up to
float rounding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

_compile = os.environ.get("RESFLOW_COMPILE", "0") not in ("", "0", "false", "False")


def set_compile(enabled: bool) -> None:
    """Fuse the elementwise kernels with ``torch.compile`` from now on (or stop)."""
    global _compile
    _compile = bool(enabled)


def compile_enabled() -> bool:
    """Whether :func:`set_compile` (or ``RESFLOW_COMPILE=1``) turned compilation on."""
    return _compile


class Fusable:
    """``fn``, or its compiled version while compilation is on."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if not _compile or self.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, fullgraph=True)
            return self.compiled(*args)
        except Exception as err:  # any compiler failure: fall back, once, loudly
            self.failed = True
            warnings.warn(
                f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); using the op-by-op kernel",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


def fusable(fn: Callable[..., Any]) -> Fusable:
    """Decorator: ``fn`` fused by ``torch.compile`` while :func:`compile_enabled`."""
    return Fusable(fn)
