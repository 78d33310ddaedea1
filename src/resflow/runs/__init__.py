"""The run folder: one place that knows what a run writes, how to read it back, and
whether a run in it is resumed, started again or refused.

A run folder holds

* ``config.yaml`` -- the registered model name and its config, the data config (with
  resolved paths) and the training config;
* ``last.pt`` / ``best.pt`` -- atomic checkpoints of plain data (model, optimizer, EMA
  and random states; their layout is :class:`resflow.checkpoint.TrainingState`);
* ``metrics.jsonl``, ``curve.png``, ``tb/`` (TensorBoard), ``samples/``.

A run trained from Python (:class:`resflow.training.Trainer`) or from the CLI can be
evaluated, sampled and resumed by either. Folders written by resflow 0.1 (a
``data.yaml`` beside ``config.yaml``) are read too.

* :mod:`resflow.runs.folder` -- :class:`RunFolder`: the files, the record, the model;
* :mod:`resflow.runs.resume` -- resume, start again or refuse, and the messages;
* :mod:`resflow.runs.outputs` -- output locations checked before any work.
"""

from resflow.runs.folder import (
    FORMAT,
    RUN_DIRS,
    RUN_FILES,
    RunConfig,
    RunExistsError,
    RunFolder,
    RunLockedError,
    check_run_record,
    file_sha256,
    load_model,
)
from resflow.runs.outputs import check_output, check_outputs, check_result_folder
from resflow.runs.resume import (
    RESUMABLE_CHANGES,
    check_resume,
    prepare_folder,
    recorded_settings,
    restart_note,
    resume_note,
)

__all__ = [
    "FORMAT",
    "RESUMABLE_CHANGES",
    "RUN_DIRS",
    "RUN_FILES",
    "RunConfig",
    "RunExistsError",
    "RunFolder",
    "RunLockedError",
    "check_output",
    "check_outputs",
    "check_result_folder",
    "check_resume",
    "check_run_record",
    "file_sha256",
    "load_model",
    "prepare_folder",
    "recorded_settings",
    "restart_note",
    "resume_note",
]
