"""What to load: the typed description of a data set, stored with every run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resflow.config import Config, param, replace


@dataclass
class DataConfig(Config):
    """A data set and how to load it (see :func:`resflow.data.load_data`).

    ``name`` is a toy density, an image data set, or a path to a ``.npy`` / ``.csv``
    matrix. Paths are stored resolved (:meth:`resolved`), so a run evaluated from
    another folder reads the same files.
    """

    name: str = param("digits", help="toy density, image data set, or .npy/.csv path")
    data_dir: str | None = param(None, help="folder with downloaded data sets")
    path: str | None = param(None, help="file or folder for the folder / npy image sets")
    n_train: int = param(50_000, ge=1, help="toy data: training points")
    n_test: int = param(10_000, ge=1, help="toy data: test points")
    n_valid: int = param(0, ge=0, help="validation examples (held out of training)")
    seed: int = param(0, help="seed of toy samples and of the validation split")
    n_bits: int | None = param(None, ge=1, le=8, help="reduce images to n bits")
    image_size: int | None = param(None, ge=1, help="resize images to this size")
    download: bool = param(False, help="download missing data (checksummed)")
    context_columns: tuple[int, ...] = param(
        (),
        ge=0,
        help="matrix files: the 0-based columns that are the context the model is "
        "conditioned on, not data (e.g. [2] or [2,3])",
    )

    def resolved(self) -> DataConfig:
        """A copy with ``data_dir``, ``path`` and a file ``name`` made absolute."""
        changes: dict[str, str] = {}
        if self.data_dir is not None:
            changes["data_dir"] = str(Path(self.data_dir).expanduser().resolve())
        if self.path is not None:
            changes["path"] = str(Path(self.path).expanduser().resolve())
        if is_file_name(self.name):
            changes["name"] = str(Path(self.name).expanduser().resolve())
        return replace(self, **changes)


def is_file_name(name: str) -> bool:
    """Whether a data set name is a path to a matrix file."""
    return Path(name).suffix.lower() in (".npy", ".csv", ".txt")
