"""The model registry: every flow family registers its models and presets here.

A *model* is a registered name (stored in checkpoints), a typed config dataclass, a
builder ``config -> Flow`` and the kind of data it takes (``"image"``: integer levels
``[C, H, W]``; ``"vector"``: real ``[D]``). A *preset* is a named config of one model
with its recommended training settings (a :class:`~resflow.train_config.TrainConfig`).
A family file calls :func:`register_model` and :func:`register_preset` at import
time; :mod:`resflow.models` imports every module of this package, so a new family is
one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from resflow.config import from_dict, to_dict
from resflow.flow import Flow
from resflow.models.configs import ImageModelConfig, VectorModelConfig
from resflow.registry import Registry
from resflow.train_config import TrainConfig

DataKind = Literal["image", "vector"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model (see the module docstring)."""

    name: str
    family: str
    kind: DataKind
    config: type
    build: Callable[[Any], Flow]
    description: str = ""
    published: Callable[[Any, str], str | None] | None = None
    """``published(config, data_name)``: the family's paper's test figure for a config on
    a data set, with its label (e.g. ``"RQ-NSF (C) in its paper: 0.64 +- 0.01"``), or
    ``None``; printed beside resflow's own figure."""

    def adapt(self, config: Any, shape: tuple[int, ...], levels: int | None) -> Any:
        """``config`` for data of ``shape`` (and ``levels`` for images): image configs
        (:class:`~resflow.models.configs.ImageModelConfig`) take ``image_shape`` and
        ``levels``, vector configs (:class:`~resflow.models.configs.VectorModelConfig`)
        ``dim``."""
        if self.kind == "image":
            if levels is None or len(shape) != 3:
                raise ValueError(
                    f"model {self.name!r} models images; the data are vectors of shape {shape}"
                )
            changes: dict[str, Any] = {"image_shape": tuple(shape), "levels": levels}
        else:
            if levels is not None or len(shape) != 1:
                raise ValueError(
                    f"model {self.name!r} models vectors; the data are images of shape {shape}"
                )
            changes = {"dim": shape[0]}
        return replace(config, **changes)


@dataclass(frozen=True)
class Preset:
    """A named configuration of a registered model.

    Attributes:
        name: unique over all families.
        model: the registered model name.
        config: the model config.
        train: recommended training settings.
        description: one line for ``resflow presets``.
        default_for: data set names (or ``"vector"`` / ``"image"``) for which the CLI
            picks this preset when only ``--model`` is given.
    """

    name: str
    model: str
    config: Any
    train: TrainConfig
    description: str = ""
    default_for: tuple[str, ...] = ()


MODELS: Registry[ModelEntry] = Registry("model")
PRESETS: Registry[Preset] = Registry("preset")


def register_model(
    name: str,
    *,
    config: type,
    build: Callable[[Any], Flow],
    kind: DataKind,
    family: str | None = None,
    description: str = "",
    published: Callable[[Any, str], str | None] | None = None,
) -> ModelEntry:
    """Register model ``name`` (its config type must be unique to it, and derive from
    the base of its kind: :class:`~resflow.models.configs.ImageModelConfig` or
    :class:`~resflow.models.configs.VectorModelConfig`)."""
    base = ImageModelConfig if kind == "image" else VectorModelConfig
    if not issubclass(config, base):
        raise TypeError(f"model {name!r}: a {kind} model's config must derive from {base.__name__}")
    for other in MODELS.items():
        if other[1].config is config:
            raise ValueError(f"config {config.__name__} is already used by model {other[0]!r}")
    entry = ModelEntry(name, family or name, kind, config, build, description, published)
    return MODELS.register(name, entry)


def register_preset(
    name: str,
    model: str,
    config: Any,
    train: TrainConfig | None = None,
    description: str = "",
    default_for: tuple[str, ...] = (),
) -> Preset:
    """Register preset ``name`` of model ``model``."""
    entry = MODELS.get(model)
    if not isinstance(config, entry.config):
        raise TypeError(f"preset {name!r}: expected a {entry.config.__name__}")
    preset = Preset(name, model, config, train or TrainConfig(), description, default_for)
    return PRESETS.register(name, preset)


def entry_for(config: Any) -> ModelEntry:
    """The registered model whose config type is ``type(config)``."""
    for _, entry in MODELS.items():
        if type(config) is entry.config:
            return entry
    raise TypeError(f"{type(config).__name__} is not the config of a registered model")


def build_model(config: Any) -> Flow:
    """Build the :class:`Flow` of any registered model config."""
    return entry_for(config).build(config)


def get_preset(name: str, **overrides: Any) -> Any:
    """A copy of preset ``name``'s model config with fields replaced by ``overrides``."""
    return replace(PRESETS.get(name).config, **overrides)


def presets_of(model: str) -> list[Preset]:
    return [p for _, p in PRESETS.items() if p.model == model]


def families() -> dict[str, list[ModelEntry]]:
    """Registered models grouped by family, in registration order."""
    out: dict[str, list[ModelEntry]] = {}
    for _, entry in MODELS.items():
        out.setdefault(entry.family, []).append(entry)
    return out


def resolve_model(name: str, kind: DataKind) -> ModelEntry:
    """The model of family ``name`` for data of ``kind``, else model ``name``."""
    for entry in families().get(name, []):
        if entry.kind == kind:
            return entry
    if name in MODELS:
        return MODELS.get(name)
    known = ", ".join(sorted(set(families()) | set(MODELS)))
    raise ValueError(f"unknown model {name!r}; choose from {known}")


def default_preset(entry: ModelEntry, data_name: str) -> Preset | None:
    """The preset of ``entry`` marked as default for ``data_name`` (or its kind)."""
    mine = presets_of(entry.name)
    for key in (data_name, entry.kind):
        for p in mine:
            if key in p.default_for:
                return p
    return None


# ---- checkpoints ---------------------------------------------------------------------------
_LEGACY_KINDS = {"vector": "residual-flow-vector", "image": "residual-flow"}


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"model": <registered name>, "config": {...}}``: plain data for checkpoints."""
    return {"model": entry_for(config).name, "config": to_dict(config)}


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; also reads the configs of resflow 0.1
    checkpoints (``{"kind": "vector" | "image", ...}``)."""
    if not isinstance(data, dict):
        raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
    if "model" in data and "config" in data:
        name, body = data["model"], data["config"]
    elif data.get("kind") in _LEGACY_KINDS:
        body = {k: v for k, v in data.items() if k != "kind"}
        name = _LEGACY_KINDS[data["kind"]]
    else:
        raise ValueError(
            "not a resflow model config: expected {'model': name, 'config': {...}} "
            f"(got keys {sorted(data)})"
        )
    if name not in MODELS:
        raise ValueError(
            f"the checkpoint's model {name!r} is not registered in this resflow "
            f"(known: {', '.join(MODELS.names())}); is it from a newer version?"
        )
    return from_dict(MODELS.get(name).config, {**_ABSENT_MEANS.get(name, {}), **body})


_ABSENT_MEANS: dict[str, dict[str, Any]] = {
    "maf": {"scale_clamp": 0.0},
    "naf": {"param_bound": 0.0, "slope_floor": 0.0},
}
"""Fields whose default changed after checkpoints without them were written: such a
checkpoint was trained with this value (the papers' unbounded maps), so it reloads with
it and gives the density it was trained with."""


def recommended_training(config: Any) -> tuple[TrainConfig, str | None]:
    """The training settings recommended for a model config, and the preset they come
    from: the preset whose config is ``config``; else, among the presets of the same
    model, the one whose config differs from it in the fewest fields (a preset changed
    with ``get_preset(name, **changes)``); else the defaults (``TrainConfig()``, None).

    >>> recommended_training(get_preset("toy2d"))[1]
    'toy2d'
    >>> train, name = recommended_training(get_preset("iresnet-digits", n_blocks=(2, 2)))
    >>> name, train == PRESETS.get("iresnet-digits").train
    ('iresnet-digits', True)
    """
    candidates = [p for _, p in PRESETS.items() if type(p.config) is type(config)]
    if not candidates:
        return TrainConfig(), None
    mine = to_dict(config)

    def distance(preset: Preset) -> int:
        theirs = to_dict(preset.config)
        return sum(mine.get(k) != v for k, v in theirs.items())

    best = min(candidates, key=distance)  # registration order breaks ties
    return best.train, best.name
