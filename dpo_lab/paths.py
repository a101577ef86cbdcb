"""Where artefacts and figures live, wherever a notebook or script is started from."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def project_root() -> Path:
    """The checkout's root (the folder holding pyproject.toml), or the working directory if none."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "dpo_lab").is_dir():
            return folder
    return here


def artifacts_dir() -> Path:
    """Cache of every stage's outputs; ``DPO_LAB_ARTIFACTS`` overrides the default ``<root>/artifacts``."""
    path = Path(os.environ.get("DPO_LAB_ARTIFACTS", project_root() / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """Figures written by notebooks and the reproduction; ``DPO_LAB_FIGURES`` overrides ``<root>/figures``.
    A folder that cannot be written is a PermissionError here, before any stage runs, not after them all."""
    path = Path(os.environ.get("DPO_LAB_FIGURES", project_root() / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    check_writable(path, "DPO_LAB_FIGURES")
    return path


def check_writable(path: Path, variable: str) -> None:
    """Create and delete a file in ``path``; a PermissionError naming it (and ``variable``) if that fails."""
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to {path} ({err.strerror or err}); make it writable or set "
                              f"{variable} to a folder you can write") from err
