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

import torch

from .core import checkpoint, tokens
from .core.model import generate_text
from .errors import FwrayError


class SampleError(FwrayError):
    """A bad sampling option, reported in one line (exit 2)."""

    exit_code = 2


# ---------------------------------------------------------------- where the model comes from (eval and export too)


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--run-id | --checkpoint, --tracking-uri and --device: how fwray's commands name a trained model."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="an MLflow run of fwray.run: its model/ artifacts")
    src.add_argument("--checkpoint", help="a folder with model.pt + model_config.json, or a Ray checkpoint (state.pt)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or fwray's local store .fwray/mlflow.db)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def load(args: argparse.Namespace, dst: str | os.PathLike, device: torch.device, with_config: bool = False):
    """(model, its config, the MLflow run it came from or None) for --run-id (downloaded into `dst`; mlflow is
    imported only then: ~1.4 s) or --checkpoint."""
    if args.run_id:
        from .tracking.store import default_uri, fetch_run

        run = fetch_run(args.run_id, args.tracking_uri or default_uri(), dst, with_config)
        return (*checkpoint.load_model(run.model_dir, device), run)
    return (*checkpoint.find_model(args.checkpoint, device), None)


# ---------------------------------------------------------------- the command


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fwray.sample", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_model_source(p)
    p.add_argument("--prompt", default="The", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=200, help="0 means no top-k cut")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        if args.max_new_tokens < 0:
            raise SampleError(f"--max-new-tokens {args.max_new_tokens}: must be 0 or more")
        with tempfile.TemporaryDirectory(prefix="fwray-sample-") as tmp:
            model, meta, _ = load(args, tmp, device)
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
