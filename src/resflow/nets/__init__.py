"""Networks used inside flow layers, registered by name.

* contractive residual branches ``g`` for residual blocks (:mod:`resflow.nets.residual`);
* conditioners of coupling and autoregressive layers (MLPs, conv nets, MADE).

Each module registers its builders in :data:`NETS` (``NETS.get("residual-mlp")``); a
new network module in this package is found automatically.
"""

from __future__ import annotations

import importlib
import pkgutil

from resflow.registry import Registry

NETS: Registry = Registry("network")
"""Network builders by name: ``NETS.get(name)(*args, **kwargs) -> nn.Module``."""

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

from resflow.nets.residual import residual_cnn, residual_mlp  # noqa: E402

__all__ = ["NETS", "residual_cnn", "residual_mlp"]
