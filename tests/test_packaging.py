"""The package states its version once: the installed metadata, ``resflow.__version__``
and ``resflow --version`` agree, and pyproject.toml takes it from the package."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import tomllib

import resflow
from resflow.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_number(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("resflow") == resflow.__version__
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"resflow {resflow.__version__}"
