"""The optional hooks are declared once (resflow.layers.hooks) and found only through
that declaration: no code probes a hook's name by itself, and ``implements`` sees
methods, attributes set in ``__init__`` and buffers, and nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

import resflow
from resflow.layers import hooks
from resflow.layers.actnorm import ActNorm
from resflow.layers.base import after_optimizer_step, preserved_transient_state

PACKAGE = Path(resflow.__file__).resolve().parent
PROTOCOLS = [
    hooks.AfterStep, hooks.AfterStepAll, hooks.SharedScope, hooks.TransientState,
    hooks.Penalty, hooks.DensityNote, hooks.Guided, hooks.DataInitialized,
    hooks.BatchStatistics, hooks.Classifier,
]  # fmt: skip


def _members(protocol: type) -> set[str]:
    names = {n for n in vars(protocol) if not n.startswith("_")}
    return names | set(getattr(protocol, "__annotations__", {}))


def test_no_module_probes_a_hook_by_name():
    names = set().union(*map(_members, PROTOCOLS))
    probes = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "hooks.py" and path.parent.name == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in names
                and not isinstance(node.args[0], ast.Call)  # getattr(type(m), ...): classes
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id == "args")
            ):
                probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.args[1].value}")
    assert not probes, probes


class _Plain(nn.Module):
    pass


class _WithPenalty(nn.Module):
    def penalty(self) -> torch.Tensor:
        return torch.ones(())


class _Guidable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.guidance = None  # set per instance, declared nowhere in the class


class _Counting(nn.Module):
    calls: list[str] = []

    def after_optimizer_step(self) -> None:
        self.calls.append("one")

    @classmethod
    def after_optimizer_step_all(cls, modules: list[nn.Module]) -> None:
        cls.calls.append(f"all {len(modules)}")


def test_implements_sees_methods_instance_attributes_and_buffers():
    assert hooks.implements(_WithPenalty(), hooks.Penalty)
    assert not hooks.implements(_Plain(), hooks.Penalty)
    assert hooks.implements(_Guidable(), hooks.Guided)
    assert not hooks.implements(_Plain(), hooks.Guided)
    assert hooks.implements(ActNorm(2), hooks.DataInitialized)  # a buffer and a method
    assert not hooks.implements(_WithPenalty(), hooks.TransientState)
    model = nn.Sequential(_Plain(), _WithPenalty(), nn.Sequential(_WithPenalty()))
    assert len(list(hooks.implementers(model, hooks.Penalty))) == 2


def test_a_class_hook_runs_once_for_all_instances_instead_of_each():
    _Counting.calls = []
    after_optimizer_step(nn.Sequential(_Counting(), _Counting(), _Counting()))
    assert _Counting.calls == ["all 3"]


def test_transient_state_is_restored():
    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.zeros(2)

        def transient_state(self) -> torch.Tensor:
            return self.v.clone()

        def load_transient_state(self, state: torch.Tensor) -> None:
            self.v = state

    m = Stateful()
    with preserved_transient_state(nn.Sequential(m)):
        m.v = torch.ones(2)
    assert torch.equal(m.v, torch.zeros(2))
