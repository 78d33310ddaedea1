"""Typed configuration: nested dataclasses <-> plain data, with checked overrides.

Every configuration in resflow (models, data, training) is a dataclass deriving from
:class:`Config`. Its fields carry their type, default, help text and range once
(:func:`param`); from them come

* validation on construction (``coeff=5`` raises ``coeff: must be < 1, got 5``),
* :func:`to_dict` / :func:`from_dict` for YAML files and checkpoints,
* :func:`override` for ``--set a.b.c=value`` at any depth, checked against the field
  types and ranges *before* anything else runs,
* command-line flags (:func:`add_flags` / :func:`given_flags`), so that no default is
  repeated by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value has the wrong type, is out of range, or is unknown."""


def param(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    help: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with help text and an allowed range (checked on construction;
    for tuples, for every element)."""
    meta = {"help": help, "range": (ge, gt, le, lt)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


class Config:
    """Base of resflow's configuration dataclasses: values are checked (and lists
    turned into tuples) on construction and by :func:`dataclasses.replace`."""

    def __post_init__(self) -> None:
        check(self)


# ---- types -------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])} like [4, 4]"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if is_dataclass(tp):
        return f"a mapping of {tp.__name__} options"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        tp, _describe(tp)
    )


def _fail(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (lists become tuples; numbers in text are parsed),
    or a :class:`ConfigError` naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                pass
        raise _fail(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _fail(key, tp, value)
    if origin is Literal:
        if value in args:
            return value
        raise _fail(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _fail(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, tp, value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(key, tp, value)
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=f"{key}.")
        raise _fail(key, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _fail(key, tp, value)


def _check_range(key: str, value: Any, rng: tuple[Any, ...]) -> None:
    ge, gt, le, lt = rng
    if isinstance(value, tuple):
        for i, v in enumerate(value):
            _check_range(f"{key}[{i}]", v, rng)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}: must be a number, got nan")
    for bound, ok, word in (
        (ge, lambda b: value >= b, ">="),
        (gt, lambda b: value > b, ">"),
        (le, lambda b: value <= b, "<="),
        (lt, lambda b: value < b, "<"),
    ):
        if bound is not None and not ok(bound):
            raise ConfigError(f"{key}: must be {word} {bound:g}, got {value:g}")


def check(cfg: Any, prefix: str = "") -> None:
    """Coerce every field of dataclass ``cfg`` to its declared type and check its range
    (in place); raises :class:`ConfigError` naming the first bad field."""
    hints = _hints(type(cfg))
    for f in fields(cfg):
        key = prefix + f.name
        value = coerce(getattr(cfg, f.name), hints[f.name], key)
        rng = f.metadata.get("range")
        if rng is not None:
            _check_range(key, value, rng)
        object.__setattr__(cfg, f.name, value)


# ---- plain data --------------------------------------------------------------------------
def to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML and ``weights_only`` checkpoints."""
    if is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from plain data; unknown keys and bad values raise
    :class:`ConfigError` with the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown option {prefix}{unknown[0]} for {cls.__name__}; choose from "
            + ", ".join(prefix + n for n in names)
        )
    hints = _hints(cls)
    kwargs = {k: coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not str(e).startswith(prefix):
            raise ConfigError(prefix + str(e)) from None
        raise


def parse_value(text: str) -> Any:
    """A value written on the command line, read as YAML (``[2, 2]``, ``true``, ``null``,
    ``0.9``); text that is not valid YAML stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[2,2]"]`` -> ``{"a.b": 1, "c": [2, 2]}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def override(cfg: C, sets: dict[str, Any]) -> C:
    """A copy of ``cfg`` with dotted keys replaced (``{"estimator.dist": "geometric"}``),
    every value checked against its field's type and range."""
    data = to_dict(cfg)
    for key, value in sets.items():
        node, cls = data, type(cfg)
        parts = key.split(".")
        for depth, part in enumerate(parts):
            names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
            here = ".".join(parts[:depth])
            if part not in names:
                where = f"{here}." if here else ""
                raise ConfigError(
                    f"unknown option {key!r} for {cls.__name__}; choose from "
                    + ", ".join(where + n for n in names)
                )
            if depth == len(parts) - 1:
                node[part] = value
            else:
                sub = _hints(cls)[part]
                sub = next((a for a in get_args(sub) if is_dataclass(a)), sub)
                if not is_dataclass(sub) or not isinstance(node[part], dict):
                    raise ConfigError(f"{'.'.join(parts[: depth + 1])} has no sub-options")
                node, cls = node[part], sub
    return from_dict(type(cfg), data)


def replace(cfg: C, **changes: Any) -> C:
    """:func:`dataclasses.replace` (the result is checked again)."""
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


# ---- command-line flags ------------------------------------------------------------------
def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    rename: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``cls`` (``batch_size`` -> ``--batch-size``; booleans as
    ``--x/--no-x``), with the field's help text and default. Flags that are not given
    stay absent (see :func:`given_flags`), so presets and dataclass defaults apply."""
    defaults, rename = defaults or {}, rename or {}
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        flag = flag_name(rename.get(f.name, f.name))
        tp = hints[f.name]
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        text = f.metadata.get("help", "")
        shown = f" (default: {default})" if default not in (None, "") else ""
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text + shown}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = rename.get(f.name, f.name).upper()
        parser.add_argument(flag, dest=f.name, **kwargs)


def given_flags(
    args: argparse.Namespace, cls: type, rename: dict[str, str] | None = None
) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line, coerced to their types (errors
    name the flag: ``--lr: expected a number, got 'abc'``)."""
    hints = _hints(cls)
    rename = rename or {}
    out: dict[str, Any] = {}
    for f in fields(cls):
        if not hasattr(args, f.name):
            continue
        flag = flag_name(rename.get(f.name, f.name))
        raw, tp = getattr(args, f.name), hints[f.name]
        takes_text = tp is str or str in get_args(tp)
        if isinstance(raw, bool):
            value = raw
        elif takes_text:  # names and paths stay text ("null" still means none)
            value = None if raw == "null" else raw
        else:
            value = parse_value(raw)
        out[f.name] = coerce(value, tp, flag)
        rng = f.metadata.get("range")
        if rng is not None:
            _check_range(flag, out[f.name], rng)
    return out
