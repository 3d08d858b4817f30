"""A trained model, named as fwray's commands name it (sample, eval, export): an MLflow run's model/ artifacts
(--run-id) or a folder on disk (--checkpoint)."""
from __future__ import annotations

import argparse
import os

import torch

from ..core import checkpoint


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--run-id | --checkpoint, --tracking-uri and --device: how fwray's commands name a trained model."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="an MLflow run of fwray.run: its model/ artifacts")
    src.add_argument("--checkpoint", help="a folder with model.pt + model_config.json, or a Ray checkpoint (state.pt)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or fwray's local store .fwray/mlflow.db)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")


def load(args: argparse.Namespace, dst: str | os.PathLike, device: torch.device, with_config: bool = False):
    """(model, its config, the MLflow run it came from or None) for --run-id (downloaded into `dst`; mlflow is
    imported only then: ~1.4 s) or --checkpoint."""
    if args.run_id:
        from .store import default_uri, fetch_run

        run = fetch_run(args.run_id, args.tracking_uri or default_uri(), dst, with_config)
        return (*checkpoint.load_model(run.model_dir, device), run)
    return (*checkpoint.find_model(args.checkpoint, device), None)
