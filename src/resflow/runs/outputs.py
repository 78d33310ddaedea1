"""Output locations checked before any work: a file or folder that can be written, and
no earlier result replaced unless ``overwrite`` is asked."""

from __future__ import annotations

import os
from pathlib import Path


def check_output(path: Path, flag: str, overwrite: bool, what: str = "file") -> None:
    """Refuse, before any work, an output location that cannot be written or that holds
    an earlier result (unless ``overwrite``); ``flag`` names it in the message."""
    if what == "file" and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if what == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"{flag} {path}: {parent} is not writable")
            break
    if what == "file" and path.exists() and not overwrite:
        raise ValueError(
            f"{flag} {path} already exists; pass --overwrite to replace it (or choose "
            f"another {flag})"
        )


def check_outputs(outputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """:func:`check_output` on each ``(flag, file)`` a command writes, and no two of them
    the same file."""
    for flag, path in outputs:
        check_output(path, flag, overwrite)
    if len({p.resolve() for _, p in outputs}) < len(outputs):
        flags = " and ".join(dict.fromkeys(f for f, _ in outputs))
        names = ", ".join(str(p) for _, p in outputs)
        raise ValueError(f"{flags} name the same file ({names}); give each its own")


def check_result_folder(path: Path, flag: str, overwrite: bool, results: tuple[str, ...]) -> None:
    """A folder for the files ``results`` (e.g. a reverse-KL fit's), refused before any
    work if it cannot be written or holds an earlier result (unless ``overwrite``)."""
    check_output(path, flag, overwrite, what="folder")
    earlier = [path / name for name in results if (path / name).exists()]
    if earlier and not overwrite:
        raise ValueError(
            f"{flag} {path} already holds a fit ({earlier[0].name}); pass --overwrite to "
            f"replace it (or choose another {flag})"
        )
