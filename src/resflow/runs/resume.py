"""Whether a run folder is resumed, started again or refused, and what is said about it.

A folder with a checkpoint is resumed (``resume``) with the settings it was trained with
(only those in :data:`RESUMABLE_CHANGES` may change), replaced (``overwrite``) or
refused. A folder holding a run stopped before its first checkpoint (a ``config.yaml``
and no ``last.pt``) loses nothing when it is started again: it is, with its recorded
settings when resumed, and with the same settings otherwise.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from resflow.checkpoint import CheckpointError
from resflow.config import override, replace
from resflow.data import DataConfig
from resflow.runs.folder import RunConfig, RunExistsError, RunFolder, check_run_record
from resflow.train_config import TrainConfig

RESUMABLE_CHANGES = (
    "steps", "eval_every", "eval_batch_size", "eval_max", "checkpoint_every", "sample_every",
    "n_samples", "log_every", "device", "tensorboard", "progress", "patience", "update_freq",
    "compile",
)  # fmt: skip
"""Training settings a resumed run may change (the others would change its result)."""


def recorded_settings(
    run: RunFolder,
    data_changes: dict[str, Any],
    train_changes: dict[str, Any],
    model_sets: dict[str, Any],
) -> RunConfig:
    """The settings a resumed run continues with: its own record, changed only by what is
    given explicitly. A record copied from another run, or one without a data set, is
    refused before any work."""
    if run.last.exists():
        check_run_record(run, "last")  # a record copied from another run, before any work
    recorded = run.read_config()
    if recorded.data is None:
        raise ValueError(f"--resume: {run.path} records no data set (trained from tensors)")
    data = replace(recorded.data, **data_changes)
    train = replace(recorded.train, **train_changes)
    model = override(recorded.model, model_sets)
    return RunConfig(model, data, train)


def resume_note(run: RunFolder) -> str:
    """What resuming ``run`` with its recorded settings does, in one line."""
    if run.stopped_before_first_checkpoint():
        return (f"{run.path} was stopped before its first checkpoint; starting it again from "
                "step 0 with its recorded model, data and settings")  # fmt: skip
    return f"resuming {run.path} with its recorded model, data and settings"


def restart_note(run: RunFolder) -> str:
    """What starting ``run`` again (stopped before its first checkpoint) does, in one line."""
    return (f"{run.path} was stopped before its first checkpoint; starting it again with the "
            "same settings")  # fmt: skip


def prepare_folder(
    run: RunFolder,
    resume: bool,
    overwrite: bool,
    model_config: Any,
    data_config: DataConfig | None,
    train: TrainConfig,
) -> bool:
    """Make ``run`` ready for a run with these settings, or refuse it
    (:class:`RunExistsError`, ``ValueError``). Returns whether a run stopped before its
    first checkpoint is started again."""
    run.clean_temporary_files()
    if resume:
        if run.stopped_before_first_checkpoint():  # resumed at step 0
            check_resume(run, data_config, train)  # before anything is removed
            run.clear(keep=("config.yaml",))
            return True
        if not run.last.exists():
            raise RunExistsError(
                f"nothing to resume: {run.last} does not exist (train without "
                "--resume to start a new run)"
            )
    elif run.has_run() and not overwrite:
        if not run.stopped_before_first_checkpoint():
            raise RunExistsError(
                f"{run.path} already holds a run; pass --resume to continue it or "
                "--overwrite to replace it (or choose another --out)"
            )
        changed = changed_since_recorded(run, model_config, data_config, train)
        if changed:
            raise RunExistsError(
                f"{run.path} holds a run stopped before its first checkpoint, with other "
                f"settings ({changed}); pass --resume to start it again with its recorded "
                "settings, or --overwrite to start it with these"
            )
        run.clear()
        return True
    elif run.has_run():
        run.clear()
    return False


def changed_since_recorded(
    run: RunFolder, model_config: Any, data_config: DataConfig | None, train: TrainConfig
) -> str:
    """What differs between the run recorded in the folder and these settings ("" if
    nothing that changes the result)."""
    try:
        recorded = run.read_config()
    except CheckpointError:
        return "an unreadable config.yaml"
    if type(recorded.model) is not type(model_config):
        return "another model"
    changes = [diff(recorded.model, model_config)]
    if data_config is not None and recorded.data != data_config.resolved():
        changes.append(
            "other data" if recorded.data is None
            else diff(recorded.data, data_config.resolved())
        )  # fmt: skip
    changes.append(diff(recorded.train, train, ignore=RESUMABLE_CHANGES))
    return ", ".join(c for c in changes if c)


def check_resume(run: RunFolder, data_config: DataConfig | None, train: TrainConfig) -> None:
    """The data and settings of a resumed run must be those it was trained with (only
    the length of the run and how it reports may change)."""
    try:
        recorded = run.read_config()
    except CheckpointError:
        return  # no readable config.yaml: the checkpoint's own records decide
    if (
        recorded.data is not None
        and data_config is not None
        and recorded.data != data_config.resolved()
    ):
        raise ValueError(
            f"--resume: {run.path} was trained on other data ({recorded.data.name}, "
            f"{diff(recorded.data, data_config.resolved())}); resume with the same "
            "data or start a new run"
        )
    changed = diff(recorded.train, train, ignore=RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"--resume: {run.path} was trained with {changed}; resume with the same "
            "settings or start a new run"
        )


def diff(old: Any, new: Any, ignore: tuple[str, ...] = ()) -> str:
    """``"lr=0.001 (now 0.01), ..."`` for the fields of two dataclasses that differ."""
    parts = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name not in ignore and a != b:
            parts.append(f"{f.name}={a} (now {b})")
    return ", ".join(parts)
