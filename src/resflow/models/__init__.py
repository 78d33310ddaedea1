"""Flow families: one module each (config + builder + presets), registered on import.

Every module of this package is imported here, so a family added as a new file is
registered without editing any list. Use :func:`build_model`, :func:`get_preset` and
the registries :data:`MODELS` / :data:`PRESETS`.
"""

from __future__ import annotations

import importlib
import pkgutil

from resflow.models.registry import (
    MODELS,
    PRESETS,
    ModelEntry,
    Preset,
    build_model,
    config_from_dict,
    config_to_dict,
    default_preset,
    entry_for,
    families,
    get_preset,
    presets_of,
    recommended_training,
    register_model,
    register_preset,
    resolve_model,
)

_SHARED = {"registry", "multiscale"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_info.name}")


def count_parameters(model: object) -> int:
    """Number of parameters (as the papers count them, frozen roulette parameters too)."""
    return sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]


__all__ = [
    "MODELS",
    "PRESETS",
    "ModelEntry",
    "Preset",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "count_parameters",
    "default_preset",
    "entry_for",
    "families",
    "get_preset",
    "presets_of",
    "recommended_training",
    "register_model",
    "register_preset",
    "resolve_model",
]
