"""`python -m fwray.sample (--run-id ID | --checkpoint PATH) [--prompt TEXT] ...`: text from a trained fwray GPT.

The model comes from an MLflow run's `model/` artifacts (model.pt + model_config.json, from a local store or a
server), from such a folder on disk, or from a Ray checkpoint folder (state.pt, whose resolved config rebuilds the
model). Weights load with `torch.load(..., weights_only=True)`. No ray import here; mlflow only for --run-id.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

from .core import hardware, tokens
from .core.model import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DEFAULT_TEMPERATURE, DEFAULT_TOP_K,
                         generate_text)
from .errors import FwrayError, command
from .tracking.trained import add_model_source, load


class SampleError(FwrayError):
    """A bad sampling option, reported in one line (exit 2)."""

    exit_code = 2


# ---------------------------------------------------------------- the command


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fwray.sample", description=__doc__.splitlines()[0].split(": ", 1)[1])
    add_model_source(p)
    p.add_argument("--prompt", default="The", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="0 means no top-k cut")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--num-samples", type=int, default=1)
    return p.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    if args.max_new_tokens < 0:
        raise SampleError(f"--max-new-tokens {args.max_new_tokens}: must be 0 or more")
    with tempfile.TemporaryDirectory(prefix="fwray-sample-") as tmp:
        model, meta, _ = load(args, tmp, device)
    enc = tokens.get_tokenizer(meta.get("tokenizer", "gpt2"))
    for i in range(args.num_samples):
        if i:
            print("\n---------------")
        print(generate_text(model, enc, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                            seed=args.seed + i, device=device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
