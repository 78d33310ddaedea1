"""The package states its version once: the installed metadata and
``resflow.__version__`` agree, and pyproject.toml takes it from the package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import tomllib

import resflow

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_number():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("resflow") == resflow.__version__
