"""`python -m fwray.sample (--run-id ID | --checkpoint PATH) [--prompt TEXT] ...`: text from a trained fwray GPT.

The model comes from an MLflow run's `model/` artifacts (model.pt + model_config.json, from a local store or a
server), from such a folder on disk, or from a Ray checkpoint folder (state.pt, whose resolved config rebuilds the
model). Weights load with `torch.load(..., weights_only=True)`. No ray import here; mlflow only for --run-id.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from . import checkpoint, tokens
from .errors import FwrayError, first_line
from .model import GPT, generate_text

class SampleError(FwrayError):
    """A model that cannot be found or read, reported in one line (exit 2)."""

    exit_code = 2


# ---------------------------------------------------------------- loading


def model_from_path(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A model folder, a Ray checkpoint folder, a run folder (its `model/`), or a Ray run folder (latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"{path}: no such checkpoint folder")
    if path.is_file():
        path = path.parent
    if checkpoint.is_model(path):
        return checkpoint.load_model(path, device)
    if checkpoint.is_state(path):
        return checkpoint.model_from_state(path, device)
    if checkpoint.is_model(path / checkpoint.MODEL_DIR):
        return checkpoint.load_model(path / checkpoint.MODEL_DIR, device)
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if checkpoint.is_state(p))
    if checkpoints:
        return checkpoint.model_from_state(checkpoints[-1], device)
    raise SampleError(f"{path}: neither {checkpoint.MODEL_FILE} + {checkpoint.MODEL_CONFIG} nor a Ray checkpoint "
                      f"({checkpoint.STATE_FILE}) there")


def model_from_run(run_id: str, tracking_uri: str, dst: str | os.PathLike,
                   device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Download the run's `model/` artifacts (local store or server) into `dst` and load them."""
    # mlflow here, not at the top: it takes ~1.4 s to import and only --run-id needs it
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise SampleError(f"no MLflow run {run_id!r} at {tracking_uri}") from None
        raise SampleError(f"MLflow at {tracking_uri} cannot be read ({first_line(e)})") from None
    except Exception as e:  # requests' ConnectionError and friends
        raise SampleError(f"MLflow at {tracking_uri} is unreachable ({type(e).__name__})") from None
    names = {Path(a.path).name for a in client.list_artifacts(run_id, checkpoint.MODEL_DIR)}
    if not {checkpoint.MODEL_FILE, checkpoint.MODEL_CONFIG} <= names:
        raise SampleError(f"MLflow run {run_id} has no model artifacts (model/{checkpoint.MODEL_FILE}, "
                          f"model/{checkpoint.MODEL_CONFIG}); "
                          "did its training finish? (python -m fwray.tracking replay logs what an outage held back)")
    local = download_artifacts(run_id=run_id, artifact_path=checkpoint.MODEL_DIR, tracking_uri=tracking_uri, dst_path=str(dst))
    return checkpoint.load_model(local, device)


# ---------------------------------------------------------------- the command


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fwray.sample", description=__doc__.splitlines()[0].split(": ", 1)[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="an MLflow run of fwray.run: its model/ artifacts")
    src.add_argument("--checkpoint", help="a folder with model.pt + model_config.json, or a Ray checkpoint (state.pt)")
    p.add_argument("--prompt", default="The", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 means no top-k cut")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or fwray's local store .fwray/mlflow.db)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    try:
        if args.max_new_tokens < 0:
            raise SampleError(f"--max-new-tokens {args.max_new_tokens}: must be 0 or more")
        with tempfile.TemporaryDirectory(prefix="fwray-sample-") as tmp:
            if args.run_id:
                from .tracking import default_uri  # with mlflow (see model_from_run): only for --run-id

                model, meta = model_from_run(args.run_id, args.tracking_uri or default_uri(), tmp, device)
            else:
                model, meta = model_from_path(args.checkpoint, device)
        enc = tokens.get_tokenizer(meta.get("tokenizer", "gpt2"))
    except FwrayError as e:
        print(f"fwray: error: {e}", file=sys.stderr)
        return e.exit_code
    for i in range(args.num_samples):
        if i:
            print("\n---------------")
        print(generate_text(model, enc, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                            seed=args.seed + i, device=device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
