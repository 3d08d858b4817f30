"""`python -m fwray.sample (--run-id ID | --checkpoint PATH) [--prompt TEXT] ...`: text from a trained fwray GPT.

The model comes from an MLflow run's `model/` artifacts (model.pt + model_config.json, from a local store or a
server), from such a folder on disk, or from a Ray checkpoint folder (state.pt, whose resolved config rebuilds the
model). Weights load with `torch.load(..., weights_only=True)`. No ray import here; mlflow only for --run-id.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from . import tokens
from .model import GPT, GPTConfig

MODEL_FILE = "model.pt"
MODEL_CONFIG = "model_config.json"
STATE_FILE = "state.pt"  # in a Ray checkpoint folder of fwray.trainer


class SampleError(RuntimeError):
    """A problem the user can fix, reported in one line (exit 2)."""


# ---------------------------------------------------------------- generation (also used in training, for samples)


def encode_prompt(enc, prompt: str) -> list[int]:
    """Training documents start after an EOT, so a prompt does too: the model reads it as a document's start."""
    return [tokens.EOT] + enc.encode_ordinary(prompt)


@torch.no_grad()
def generate_text(model: GPT, enc, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, device: torch.device | str | None = None) -> str:
    """The prompt and its continuation, cut at the first generated EOT. Same model, prompt and seed: same text."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = torch.tensor([encode_prompt(enc, prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)[0].tolist()
    model.train(was_training)
    new = out[idx.size(1):]
    if tokens.EOT in new:
        new = new[:new.index(tokens.EOT)]
    return prompt + enc.decode(new)


# ---------------------------------------------------------------- loading


def model_from_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """GPT from a folder of model.pt + model_config.json (the run's `model/` artifacts), and that config."""
    folder = Path(folder)
    cfg_path, weights = folder / MODEL_CONFIG, folder / MODEL_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise SampleError(f"{folder}: expected {MODEL_FILE} and {MODEL_CONFIG} there")
    meta = json.loads(cfg_path.read_text())
    fields = GPTConfig.__dataclass_fields__
    model = GPT(GPTConfig(**{k: v for k, v in meta.items() if k in fields}))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta


def model_from_state(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """GPT from a Ray checkpoint folder of fwray.trainer (state.pt holds the weights and the resolved config)."""
    import yaml

    from . import config, engine

    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    exp = config.from_dict(yaml.safe_load(state["config"]), str(Path(folder) / STATE_FILE))
    model = GPT(engine.gpt_config(exp))
    model.load_state_dict(state["model"])
    meta = {**vars(engine.gpt_config(exp)), "tokenizer": exp.data.tokenizer, "step": state["step"]}
    return model.to(device).eval(), meta


def model_from_path(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """A model folder, a Ray checkpoint folder, a run folder (its `model/`), or a Ray run folder (latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"{path}: no such checkpoint folder")
    if path.is_file():
        path = path.parent
    if (path / MODEL_FILE).is_file():
        return model_from_folder(path, device)
    if (path / STATE_FILE).is_file():
        return model_from_state(path, device)
    if (path / "model" / MODEL_FILE).is_file():
        return model_from_folder(path / "model", device)
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if (p / STATE_FILE).is_file())
    if checkpoints:
        return model_from_state(checkpoints[-1], device)
    raise SampleError(f"{path}: neither {MODEL_FILE} + {MODEL_CONFIG} nor a Ray checkpoint ({STATE_FILE}) there")


def model_from_run(run_id: str, tracking_uri: str, dst: str | os.PathLike,
                   device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Download the run's `model/` artifacts (local store or server) into `dst` and load them."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise SampleError(f"no MLflow run {run_id!r} at {tracking_uri}") from None
        raise SampleError(f"MLflow at {tracking_uri} cannot be read ({_first_line(e)})") from None
    except Exception as e:  # requests' ConnectionError and friends
        raise SampleError(f"MLflow at {tracking_uri} is unreachable ({type(e).__name__})") from None
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    if not {MODEL_FILE, MODEL_CONFIG} <= names:
        raise SampleError(f"MLflow run {run_id} has no model artifacts (model/{MODEL_FILE}, model/{MODEL_CONFIG}); "
                          "did its training finish? (python -m fwray.tracking replay logs what an outage held back)")
    local = download_artifacts(run_id=run_id, artifact_path="model", tracking_uri=tracking_uri, dst_path=str(dst))
    return model_from_folder(local, device)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------- the command


def default_uri() -> str:
    from .tracking import local_fallback_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or local_fallback_uri()


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
                model, meta = model_from_run(args.run_id, args.tracking_uri or default_uri(), tmp, device)
            else:
                model, meta = model_from_path(args.checkpoint, device)
        enc = tokens.get_tokenizer(meta.get("tokenizer", "gpt2"))
    except (SampleError, tokens.TokenizerUnavailable) as e:
        print(f"fwray: error: {e}", file=sys.stderr)
        return 2
    for i in range(args.num_samples):
        if i:
            print("\n---------------")
        print(generate_text(model, enc, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                            seed=args.seed + i, device=device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
