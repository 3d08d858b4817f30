"""`python -m fwray.eval (--run-id ID | --checkpoint PATH) [--hellaswag FILE.jsonl] [--limit N]`: a trained model's
validation loss and bits per byte on its run's data, and HellaSwag accuracy from a local file.

Validation reads the split the run trained beside: the token cache its MLflow run names (tag fwray.cache), or for a
checkpoint the cache its run folder's config.yaml maps to, or --data (a cache on object storage is fetched to this
machine's node cache). By default it reads the very windows the training's evaluations read (eval_iters batches of
eval_batch_size, drawn from the run's seed), so eval_val_loss is the run's last val_loss for its final model;
--all-val reads every validation token once instead (windows at stride block_size). bpb follows fwray.core.bpb. The yardstick (the run's `yardstick` section, or --yardstick FILE) is read as
training reads it (fwray.core.yardstick). With --run-id the results are logged to that run at the model's step
(metrics eval_val_loss, eval_val_bpb, eval_yardstick_val_loss, hellaswag_acc, hellaswag_acc_norm; tags fwray.eval.*)
and printed; else printed.
No ray import; mlflow only for --run-id.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from . import config
from .config import TrainConfig
from .core import bpb, checkpoint, engine, hardware, hellaswag, loader, tokens
from .core.yardstick import WHERE_FROM, Yardstick
from .errors import FwrayError, command
from .storage.node_cache import local_files
from .storage.uri import is_uri
from .tracking.trained import add_model_source, load


class EvalError(FwrayError):
    """Nothing to evaluate, or data that cannot be found: one line with the fix (exit 2)."""

    exit_code = 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fwray.eval", description="A trained model's validation loss and bits "
                                "per byte on its run's data, and HellaSwag accuracy from a local file.")
    add_model_source(p)
    p.add_argument("--hellaswag", metavar="FILE.jsonl", help="HellaSwag examples, e.g. hellaswag_val.jsonl")
    p.add_argument("--limit", type=int, metavar="N", help="at most N validation windows and N HellaSwag examples")
    p.add_argument("--all-val", action="store_true",
                   help="every validation token once, instead of the windows the training's evaluations read")
    p.add_argument("--data", metavar="FOLDER", help="a prepared token cache entry (its manifest.json) to validate on "
                   "instead of the run's")
    p.add_argument("--yardstick", metavar="FILE", help="an llm.c token file (.bin) or a parquet of documents to "
                   "report the yardstick loss on, instead of the run's yardstick (the README's Yardstick section)")
    p.add_argument("--no-val", action="store_true", help="skip the validation and yardstick losses (HellaSwag only)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- validation


def val_data(args, run, exp) -> tuple[Path | str, dict]:
    """(cache entry, manifest): --data, else the cache the MLflow run names, else the one its experiment maps to; a
    folder or an entry on object storage."""
    if args.data:
        folder = args.data
    elif run is not None and run.tags.get("fwray.cache"):
        folder = run.tags["fwray.cache"]
    elif exp is not None:
        from .data import prepare  # pyarrow; only for a checkpoint without --data
        from .data.parquet_inputs import inspect_file, resolve_paths

        hit = prepare.cached(exp.data, [inspect_file(p, exp.data) for p in resolve_paths(exp.data.paths)])
        if hit is None:
            raise EvalError(f"the validation data of {exp.source} is not prepared under {exp.data.cache_dir}: run "
                            f"`python -m fwray.prepare {exp.source}` there, pass --data FOLDER, or --no-val")
        return hit
    else:
        raise EvalError(f"{args.checkpoint}: no config.yaml beside this model says what it trained on: pass --data "
                        "FOLDER (a token cache entry with manifest.json), or --no-val")
    if is_uri(folder):
        from .data.prepare import read_manifest  # pyarrow.fs; only for an entry on object storage

        manifest = read_manifest(folder)
    else:
        manifest = tokens.read_manifest(folder)
    if manifest is None:
        raise EvalError(f"{folder}: no prepared token cache there (no {tokens.MANIFEST}); pass --data FOLDER, or "
                        "--no-val")
    return folder, manifest


def val_batches(shards: loader.TokenShards, train: TrainConfig, all_windows: bool, limit: int | None):
    """The validation batches: the training's (eval_iters x eval_batch_size windows from its seed), or every window
    at stride block_size; at most `limit` windows."""
    size = train.eval_batch_size or train.batch_size
    if all_windows:
        starts = shards.epoch_layout(align_to_documents=False)[:limit]
        for i in range(0, len(starts), size):
            yield shards.batch(starts[i:i + size])
        return
    left = limit if limit is not None else train.eval_iters * size
    for i in range(train.eval_iters):
        if left <= 0:
            return
        x, y = loader.val_batch(shards, train.seed, i, size)
        yield x[:left], y[:left]
        left -= len(x)


def validation(model, folder: Path | str, manifest: dict, train: TrainConfig, args, dtype, metrics: dict,
               tags: dict) -> None:
    """Validate, print the line, and add to the metrics and tags logged."""
    files = tokens.split_files(folder, manifest, "val")
    if is_uri(folder):  # this machine's copy
        files = local_files(tuple(files), tokens.shard_hashes(manifest), None)
    shards = loader.TokenShards(files, model.config.block_size)
    device_type = next(model.parameters()).device.type
    with engine.autocast_context(device_type, dtype):
        losses = engine.ValLoss.of(engine.loss_sums(model, val_batches(shards, train, args.all_val, args.limit)))
    windows = losses.targets // model.config.block_size
    what = "every window at stride block_size" if args.all_val else "the training's evaluation windows"
    line = (f"validation: {windows:,} windows x {model.config.block_size} tokens ({what}) of {folder}: "
            f"loss {losses.loss:.4f}")
    metrics["eval_val_loss"] = losses.loss
    counts = bpb.text_counts(manifest)
    if counts:
        metrics["eval_val_bpb"] = bpb.bits_per_byte(losses.text_loss, *counts)
        line += f" | bpb {metrics['eval_val_bpb']:.4f}"
    else:
        line += " | no bpb: this cache was prepared before fwray counted bytes (prepare it again for bpb)"
    print(line, flush=True)
    tags.update({"fwray.eval.val_data": str(folder), "fwray.eval.val_windows": f"{windows} ({what})"})


def yardstick_source(args, exp) -> Yardstick | None:
    """--yardstick FILE, else the run's yardstick (None without one); a parquet must be tokenized already (its
    shards fetched here when the cache is on object storage)."""
    from .data.yardstick import on_this_node, yardstick_of  # pyarrow: only with a yardstick

    wanted = exp.yardstick if exp is not None else config.YardstickConfig()
    if args.yardstick:
        if not os.path.isfile(args.yardstick):  # said as the option given, not as the experiment's key
            raise EvalError(f"--yardstick {args.yardstick}: no such file; {WHERE_FROM}")
        wanted = dataclasses.replace(wanted, path=os.path.abspath(args.yardstick), name=None)
    if wanted.path is None:
        return None
    data = exp.data if exp is not None else config.DataConfig()
    found = yardstick_of(wanted, data, exp.source if exp is not None else "--yardstick", training=False)
    return on_this_node(found, data.node_cache_dir)


def yardstick_validation(model, yardstick: Yardstick, train: TrainConfig, args, dtype, metrics: dict,
                         tags: dict) -> None:
    """The yardstick's loss, read as the training's evaluations read it (--limit caps its windows too)."""
    block = model.config.block_size
    if args.limit is not None:
        cap = args.limit * block
        yardstick = dataclasses.replace(yardstick, targets=min(cap, yardstick.targets or cap))
    batches = yardstick.open(block, train.eval_batch_size or train.batch_size)
    device_type = next(model.parameters()).device.type
    with engine.autocast_context(device_type, dtype):
        loss = engine.ValLoss.of(engine.loss_sums(model, map(batches.batch, range(batches.num_batches)))).loss
    metrics["eval_yardstick_val_loss"] = loss
    tags["fwray.eval.yardstick"] = yardstick.describe(block)
    print(f"yardstick: {tags['fwray.eval.yardstick']}: loss {loss:.4f}", flush=True)


# ---------------------------------------------------------------- the command


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: must be at least 1")
    if args.no_val and not args.hellaswag:
        raise EvalError("--no-val without --hellaswag leaves nothing to evaluate")
    examples = hellaswag.read_examples(args.hellaswag, args.limit) if args.hellaswag else None  # before any work
    with tempfile.TemporaryDirectory(prefix="fwray-eval-") as tmp:
        model, meta, run = load(args, tmp, device, with_config=True)
        if run is not None:  # the resolved experiment: the validation settings, and where its data is
            exp = config.load(run.config_file) if run.config_file else None
        else:
            exp = checkpoint.experiment_near(args.checkpoint)
    val = None if args.no_val else val_data(args, run, exp)  # every input found before any work
    yardstick = None if args.no_val else yardstick_source(args, exp)
    enc = tokens.get_tokenizer(meta.get("tokenizer", "gpt2")) if examples else None
    train = exp.train if exp else TrainConfig()
    dtype = engine.autocast_dtype(train, device.type)  # as the training evaluated
    metrics, tags = {}, {}
    print(f"model: step {meta.get('step')}, {model.num_params():,} parameters ({meta.get('recipe', 'gpt2')})")
    if val is not None:
        validation(model, *val, train, args, dtype, metrics, tags)
    if yardstick is not None:
        yardstick_validation(model, yardstick, train, args, dtype, metrics, tags)
    if examples:
        with engine.autocast_context(device.type, dtype):
            hs = hellaswag.accuracy(model, enc, examples, device)
        metrics.update(hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"])
        print(f"hellaswag: {hs['examples']:,} examples of {args.hellaswag}: acc {hs['acc']:.4f} | "
              f"acc_norm {hs['acc_norm']:.4f}", flush=True)
        tags["fwray.eval.hellaswag"] = f"{args.hellaswag} ({hs['examples']} examples)"
    if run is not None:
        from .tracking.live import log_evaluation
        from .tracking.store import default_uri

        uri = args.tracking_uri or default_uri()
        log_evaluation(args.run_id, uri, int(meta.get("step") or 0), metrics, tags)
        print(f"logged to MLflow run {args.run_id} at {uri}: {', '.join(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
