"""A trained model, named as fwray's commands name it (sample, eval, export): an MLflow run's model/ artifacts
(--run-id) or a folder on disk (--checkpoint)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import checkpoint
from ..errors import first_line
from ..storage.check import describe
from ..storage.uri import download, exists, is_uri


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--run-id | --checkpoint, --tracking-uri and --device: how fwray's commands name a trained model."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="an MLflow run of fwray.run: its model/ artifacts")
    src.add_argument("--checkpoint", help="a folder with model.pt + model_config.json, or a Ray checkpoint (state.pt); "
                     "on object storage too (s3://bucket/runs/RUN/model)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or fwray's local store .fwray/mlflow.db)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")


def load(args: argparse.Namespace, dst: str | os.PathLike, device: torch.device, with_config: bool = False):
    """(model, its config, the MLflow run it came from or None) for --run-id (downloaded into `dst`; mlflow is
    imported only then) or --checkpoint (a folder on object storage downloaded into `dst`)."""
    if args.run_id:
        from .store import default_uri

        run = fetch_run(args.run_id, args.tracking_uri or default_uri(), dst, with_config)
        return (*checkpoint.load_model(run.model_dir, device), run)
    folder = fetch_folder(args.checkpoint, Path(dst) / "checkpoint") if is_uri(args.checkpoint) else args.checkpoint
    return (*checkpoint.find_model(folder, device), None)


def fetch_folder(uri: str, dst: Path) -> Path:
    """A model or checkpoint folder on object storage, downloaded: a missing one, or one the store refuses, is one
    line."""
    try:
        if not exists(uri):
            raise checkpoint.ModelNotFound(f"--checkpoint {uri}: nothing there; give a run's model folder "
                                           "(<resources.storage_path>/<run>/model) or one of its checkpoints")
        download(uri, dst)
    except OSError as e:
        raise checkpoint.ModelNotFound(describe(e, uri, "--checkpoint")) from None
    return dst


@dataclass(frozen=True)
class FetchedRun:
    model_dir: Path  # the run's model/ artifacts, downloaded
    config_file: Path | None  # its config.yaml (the resolved experiment), when asked for and logged
    tags: dict[str, str]

def fetch_run(run_id: str, uri: str, dst: str | os.PathLike, with_config: bool = False) -> FetchedRun:
    """Download a run's `model/` artifacts (and `config.yaml`) from a local store or a server into `dst`. An unknown
    run, an unreadable store or a run without a model is one-line `ModelNotFound`."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..core.checkpoint import CONFIG_FILE, MODEL_CONFIG, MODEL_DIR, MODEL_FILE, ModelNotFound

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelNotFound(f"no MLflow run {run_id!r} at {uri}") from None
        raise ModelNotFound(f"MLflow at {uri} cannot be read ({first_line(e)})") from None
    except Exception as e:  # requests' ConnectionError and friends
        raise ModelNotFound(f"MLflow at {uri} is unreachable ({type(e).__name__})") from None
    names = {Path(a.path).name for a in client.list_artifacts(run_id, MODEL_DIR)}
    if not {MODEL_FILE, MODEL_CONFIG} <= names:
        raise ModelNotFound(f"MLflow run {run_id} has no model artifacts ({MODEL_DIR}/{MODEL_FILE}, "
                            f"{MODEL_DIR}/{MODEL_CONFIG}); did its training finish? (python -m fwray.tracking replay "
                            "logs what an outage held back)")
    model_dir = Path(download_artifacts(run_id=run_id, artifact_path=MODEL_DIR, tracking_uri=uri, dst_path=str(dst)))
    config_file = None
    if with_config and CONFIG_FILE in {a.path for a in client.list_artifacts(run_id)}:
        config_file = Path(download_artifacts(run_id=run_id, artifact_path=CONFIG_FILE, tracking_uri=uri,
                                              dst_path=str(dst)))
    return FetchedRun(model_dir, config_file, dict(run.data.tags))
