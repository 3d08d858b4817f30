"""`python -m fwray.export (--run-id ID | --checkpoint PATH) OUT [--format hf|safetensors] [--force]`: a trained
model in a folder that other tools load.

- hf (the gpt2 recipe): what transformers' `AutoModelForCausalLM.from_pretrained(OUT)` and
  `AutoTokenizer.from_pretrained(OUT)` load offline: model.safetensors + config.json (GPT2LMHeadModel, with fwray's
  exact GELU), generation_config.json, and GPT-2's tokenizer (vocab.json, merges.txt, tokenizer.json,
  tokenizer_config.json) written from tiktoken's cached files. The vocabulary is GPT-2's 50257: the padding rows
  fwray adds for speed are left out (no text holds their ids and fwray's sampler never picks them), so greedy
  generation is fwray's token for token. fwray reads every document after <|endoftext|>: start a prompt with it,
  as fwray.sample does (`[tok.bos_token_id] + tok(prompt).input_ids`).
- safetensors (any recipe): model.safetensors + model_config.json, a final-model folder that
  fwray.core.checkpoint.load_model, fwray.sample and fwray.eval load.

The export is written into a temporary folder beside OUT and renamed into place, so a crash leaves no half export.
An OUT that exists and is not empty is refused unless --force replaces it. No ray import; mlflow only for --run-id.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .config import ConfigError
from .core import checkpoint, tokens
from .core.hf import gpt2_state_dict_to_hf
from .errors import FwrayError, command
from .tracking.trained import add_model_source, load

FORMATS = ("hf", "safetensors")
EOT_TEXT = "<|endoftext|>"


class ExportError(FwrayError):
    """An export that cannot be written as asked: one line with the fix (exit 2)."""

    exit_code = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fwray.export",
                                description="Write a trained model into a folder other tools load.")
    add_model_source(p)
    p.add_argument("out", metavar="OUT", help="the folder to write (refused if it exists and is not empty)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: transformers' GPT2LMHeadModel + tokenizer (gpt2 recipe); safetensors: fwray's model "
                        "folder, any recipe (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the formats


def write_hf(folder: Path, state: dict, meta: dict) -> None:
    cfg = checkpoint.model_config(meta)
    try:
        hf_config, hf_state = gpt2_state_dict_to_hf(state, cfg, vocab_size=tokens.VOCAB_SIZE)
    except ConfigError as e:
        raise ExportError(f"{e}; transformers has no architecture for this model: --format safetensors writes "
                          "model.safetensors + model_config.json (any recipe; fwray.core.checkpoint.load_model loads it)")
    bpe = tokens.gpt2_bpe_files()  # before transformers' slow import: a missing cache fails at once
    try:
        import transformers
    except ImportError:
        raise ExportError("--format hf needs transformers: pip install 'fwray[export]'") from None
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config))
    model.load_state_dict(hf_state, strict=True)
    model.generation_config = transformers.GenerationConfig(bos_token_id=tokens.EOT, eos_token_id=tokens.EOT,
                                                            pad_token_id=tokens.EOT)
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" for one file
    model.save_pretrained(folder)  # model.safetensors (the tied head stored once), config.json, generation_config.json
    for name, data in bpe.items():
        tokens.write_atomic(folder / name, data)
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    # GPT-2's own tokenizer settings: no token added to the text, so it encodes exactly as tiktoken does
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", **special,
                                                   "add_bos_token": False, "add_prefix_space": False,
                                                   "errors": "replace", "model_max_length": cfg.block_size})
    _write_json(folder / "special_tokens_map.json", special)
    # tokenizer.json, the fast tokenizer whole (what tools without transformers read), as transformers converts it
    transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))


def write_safetensors(folder: Path, state: dict, meta: dict) -> None:
    try:
        checkpoint.save_safetensors(folder, state, meta)
    except ImportError:
        raise ExportError("--format safetensors needs safetensors: pip install 'fwray[export]'") from None


def _write_json(path: Path, obj: dict) -> None:
    tokens.write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---------------------------------------------------------------- the folder, whole or not at all


def check_out(out: Path, force: bool, source: str | None) -> None:
    """Refuse an OUT that holds anything (unless --force), or the model being exported, or the working folder."""
    if source and (out.resolve() == Path(source).resolve() or out.resolve() in Path(source).resolve().parents):
        raise ExportError(f"{out}: holds the model being exported ({source}); choose another folder")
    if out.resolve() == Path.cwd() or out.resolve() in Path.cwd().parents:
        raise ExportError(f"{out}: is the working folder or above it; choose a folder of its own")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not empty; choose another folder, or pass --force to replace it")


def publish(out: Path, write) -> None:
    """`write(folder)` into a temporary folder beside OUT, every file synced, then renamed to OUT (what was there
    is removed only once the export is whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{what}-{os.getpid()}" for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed export's, if this pid had one
    tmp.mkdir()
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)  # as any new file: some writers (transformers') make theirs private
            tokens.fsync(path)
        tokens.fsync(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        tokens.fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()


# ---------------------------------------------------------------- the command


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    check_out(out, args.force, args.checkpoint)  # before minutes of download or load
    with tempfile.TemporaryDirectory(prefix="fwray-export-") as tmp:
        model, meta, _ = load(args, tmp, torch.device("cpu"))
    state = model.state_dict()
    publish(out, lambda folder: (write_hf if args.format == "hf" else write_safetensors)(folder, state, meta))
    print(f"exported ({args.format}) to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.format == "hf":
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}), "
              f"AutoTokenizer.from_pretrained({str(out)!r}); prompts start with {EOT_TEXT}, as fwray's do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
