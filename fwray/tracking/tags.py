"""What a parent run is tagged with: fwray's version and commit, the device, the library versions, the source."""
from __future__ import annotations

import getpass
import os
import platform
import subprocess
from pathlib import Path

import mlflow

from .. import __version__
from ..config import Experiment


def git_commit(folder: str | os.PathLike | None = None) -> tuple[str, bool] | None:
    """(commit, dirty) of the checkout holding the fwray package; None when it is not a git checkout."""
    root = Path(folder) if folder else Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(status)) if commit else None

def version_tags() -> dict[str, str]:
    # torch and ray here, not at the top: `python -m fwray.tracking replay` and `metrics` need neither
    import ray
    import torch

    return {"torch_version": torch.__version__, "ray_version": ray.__version__, "mlflow_version": mlflow.__version__,
            "python_version": platform.python_version()}

def run_tags(exp: Experiment, device: str) -> dict[str, str]:
    """The parent run's tags: fwray version and commit, device (GPU name or "cpu"), library versions, source."""
    tags = {"fwray.version": __version__, "fwray.device": device, "fwray.experiment_file": exp.source,
            "mlflow.source.name": "fwray.run", "mlflow.source.type": "LOCAL", **version_tags()}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # no user name in some containers
        pass
    found = git_commit()
    if found:
        tags["fwray.git_commit"] = tags["mlflow.source.git.commit"] = found[0]
        tags["fwray.git_dirty"] = str(found[1]).lower()
    return tags
