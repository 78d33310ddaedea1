"""The files of one run folder: its record (``config.yaml``), its checkpoints, and the
model and data read back from them (see :mod:`resflow.runs`)."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from resflow.checkpoint import CheckpointError, ema_weights, load_checkpoint
from resflow.config import from_dict, override, to_dict
from resflow.data import DataConfig, DataSplit, load_data
from resflow.data.config import is_file_name
from resflow.flow import Flow, non_finite_weights
from resflow.io import atomic_write_text
from resflow.layers.base import after_optimizer_step
from resflow.models import build_model, config_from_dict, config_to_dict
from resflow.train_config import TrainConfig

FORMAT = 2
"""Version of the run-folder layout (1: resflow 0.1)."""


class RunExistsError(RuntimeError):
    """The run folder already holds a run and neither resuming nor overwriting was asked."""


class RunLockedError(RuntimeError):
    """Another process is writing to the run folder."""


#: What a run writes (removed by :meth:`RunFolder.clear` before an overwrite).
RUN_FILES = (
    "config.yaml", "last.pt", "best.pt", "metrics.jsonl", "curve.png", "samples.png",
    "samples_denoised.png", "density.png", "data.yaml",
)  # fmt: skip
RUN_DIRS = ("tb", "samples")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: model, data and training configs."""

    model: Any
    data: DataConfig | None
    train: TrainConfig


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: IO[str] | None = None

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def has_run(self) -> bool:
        """Whether a run has been written here (a config or a checkpoint)."""
        return self.config_file.exists() or self.last.exists() or self.best.exists()

    def stopped_before_first_checkpoint(self) -> bool:
        """Whether a run was started here and stopped (killed, interrupted, failed) before
        it wrote its first checkpoint: a ``config.yaml`` and no ``last.pt`` / ``best.pt``.
        Nothing of it can be lost: it is started again in place."""
        return self.config_file.exists() and not self.last.exists() and not self.best.exists()

    def _restartable(self) -> bool:
        """Stopped before its first checkpoint, with a readable record to start it from."""
        if not self.stopped_before_first_checkpoint():
            return False
        try:
            self.read_config()
        except CheckpointError:
            return False
        return True

    # ---- safety ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Take an exclusive lock on the folder (``.lock``) for this process; a second
        writer gets :class:`RunLockedError`. Released by :meth:`unlock` or at exit."""
        if self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")  # noqa: SIM115 (held while training)
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            self._lock = f
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"{self.path} is in use by {owner}; wait for it to finish or use another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"resflow process {os.getpid()}")
        f.flush()
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def clean_temporary_files(self) -> list[Path]:
        """Remove the temporary files of interrupted atomic writes (``*.tmp``)."""
        removed = []
        for folder in (self.path, self.path / "samples"):
            if folder.is_dir():
                for tmp in folder.glob("*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove a previous run's files (for an explicit overwrite), but those in ``keep``."""
        for name in RUN_FILES:
            if name not in keep:
                (self.path / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)

    # ---- config ---------------------------------------------------------------------------
    def write_config(self, config: RunConfig) -> Path:
        data = None
        if config.data is not None:
            data = to_dict(config.data.resolved())
        doc: dict[str, Any] = {
            "resflow": FORMAT,
            "model": config_to_dict(config.model),
            "data": data,
            "train": to_dict(config.train),
        }
        if data is not None and is_file_name(data["name"]) and Path(data["name"]).is_file():
            doc["data_sha256"] = file_sha256(data["name"])
        return atomic_write_text(self.config_file, yaml.safe_dump(doc, sort_keys=False))

    def recorded_data_sha256(self) -> str | None:
        if not self.config_file.exists():
            return None
        doc = yaml.safe_load(self.config_file.read_text())
        return doc.get("data_sha256") if isinstance(doc, dict) else None

    def read_config(self) -> RunConfig:
        """The run's configs (resflow 0.1 folders included); clear errors for missing or
        damaged records."""
        if not self.config_file.exists():
            raise CheckpointError(
                f"{self.path} has no config.yaml; is it a run folder written by resflow?"
            )
        try:
            doc = yaml.safe_load(self.config_file.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a mapping")
            model = config_from_dict(doc["model"])
            train = from_dict(TrainConfig, doc.get("train") or {})
            if doc.get("resflow") is None:  # resflow 0.1
                data = self._legacy_data()
            else:
                data = None if doc.get("data") is None else from_dict(DataConfig, doc["data"])
        except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:
            raise CheckpointError(f"damaged run record {self.config_file}: {e}") from e
        return RunConfig(model, data, train)

    def _legacy_data(self) -> DataConfig | None:
        path = self.path / "data.yaml"
        if not path.exists():
            return None
        info = yaml.safe_load(path.read_text())
        return DataConfig(
            name=info["data"],
            data_dir=info.get("data_dir"),
            n_train=info["n_train"],
            n_test=info["n_test"],
            seed=info["seed"],
            n_bits=info.get("n_bits"),
        )

    # ---- model and data -------------------------------------------------------------------
    def checkpoint(self, which: str = "best") -> Path:
        """``best.pt`` (or ``last.pt`` while there is no best yet), ``last.pt``, or a path."""
        if which not in ("best", "last"):
            path = Path(which)
        else:
            path = self.best if which == "best" else self.last
            if which == "best" and not path.exists():
                path = self.last  # no evaluation happened yet
        if not path.exists():
            if which in ("best", "last") and self._restartable():
                raise CheckpointError(
                    f"no checkpoint in {self.path} yet: the run was stopped before its first "
                    f"checkpoint; start it again with `resflow train --resume --out {self.path}`"
                )
            raise CheckpointError(f"no checkpoint {path} (is {self.path} a resflow run folder?)")
        return path

    def load_model(
        self, which: str = "best", ema: bool = True, overrides: dict[str, Any] | None = None
    ) -> Flow:
        """The run's model in eval mode, with the EMA weights by default (as the papers
        evaluate). ``overrides`` change options that keep the parameters, e.g.
        ``{"estimator.eval_dist": "poisson"}``."""
        return load_model(self.checkpoint(which), ema=ema, overrides=overrides)

    def load_data(self, data_dir: str | None = None) -> DataSplit:
        """The run's data, as recorded at training (``data_dir`` replaces the recorded
        folder, e.g. on another machine)."""
        cfg = self.read_config().data
        if cfg is None:
            raise CheckpointError(
                f"{self.path} records no data set (its data were passed to the trainer as "
                "tensors); load them yourself and call resflow.evaluate"
            )
        expected = self.recorded_data_sha256()
        if expected is not None and Path(cfg.name).is_file() and file_sha256(cfg.name) != expected:
            raise CheckpointError(
                f"the data file {cfg.name} has changed since {self.path} was trained "
                "(its checksum differs); restore it or evaluate on purpose with the library"
            )
        return load_data(cfg, data_dir=data_dir) if data_dir else load_data(cfg)


def load_model(
    run: str | Path,
    which: str = "best",
    ema: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Flow:
    """The model of a run folder (``which`` = ``best`` / ``last``) or of a ``.pt`` file,
    in eval mode, with the EMA weights by default."""
    run = Path(run)
    path = run if run.suffix == ".pt" else RunFolder(run).checkpoint(which)
    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(state["model_config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if overrides:
        cfg = override(cfg, overrides)  # a ConfigError naming the user's option
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])  # also loads ActNorm's initialised flags
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        if overrides:
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise CheckpointError(
                f"the weights of {path} do not fit the model with "
                f"{', '.join(f'{k}={v}' for k, v in overrides.items())} ({detail}): that "
                "option changes the parameters (a model that is not fully convolutional "
                "cannot change its image size)"
            ) from None
        raise CheckpointError(
            f"{path} does not fit its model config ({lines[0]}); is the file damaged?"
        ) from None
    shadow = ema_weights(state)
    if ema and "ema" in state:
        if shadow is None:
            raise CheckpointError(f"{path} is damaged: its EMA state has no shadow weights")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in shadow:
                    p.copy_(shadow[name])
    model.eval()
    if not non_finite_weights(model):  # else the caller refuses it (no norms of NaN weights)
        after_optimizer_step(model)
    return model


def check_run_record(folder: RunFolder, which: str = "best") -> None:
    """Refuse a run folder whose ``config.yaml`` does not describe its checkpoint (a
    record copied from another run): its data and model would not fit each other. A
    ``CheckpointError`` saying what differs."""
    path = folder.checkpoint(which)
    if which not in ("best", "last") or not folder.config_file.exists():
        return  # a checkpoint named by path, or a folder without records: nothing to match
    recorded = folder.read_config()
    state = load_checkpoint(path)
    try:
        saved = config_from_dict(state["model_config"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if saved != recorded.model:
        ours, theirs = config_to_dict(recorded.model), config_to_dict(saved)
        if ours["model"] != theirs["model"]:
            detail = f"model {ours['model']} in the record, {theirs['model']} in the checkpoint"
        else:
            keys = [k for k in theirs["config"] if ours["config"].get(k) != theirs["config"][k]]
            detail = f"{', '.join(keys[:3])} differ" if keys else "the configs differ"
        raise CheckpointError(
            f"{folder.config_file} does not describe {path} ({detail}): is the record "
            "copied from another run?"
        )
