"""The yardstick's files, found by the driver before training (fwray.run) or evaluation (fwray.eval).

An llm.c token file is read where it is (its header checked here, in one line, rather than in a Ray worker). A parquet
goes through the prepare cache, tokenized exactly as training data is (same tokenizer, same filters, an EOT before
each document) and by the same Ray Data path, once: the entry is keyed by the file and the data settings, so every
later run and `fwray.eval` find it, and it is the same entry `python -m fwray.prepare EXP data.paths=[FILE]` builds.
Both of the entry's splits are read (train shards, then val): the split rule means nothing for a set never trained on.
With the cache on object storage, whoever reads the yardstick reads its node's copy (`on_this_node`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import DataConfig, Experiment, YardstickConfig
from ..core import tokens
from ..core.yardstick import Yardstick, YardstickError, read_llmc
from . import prepare
from ..storage import node_cache
from .parquet_inputs import inspect_file, resolve_paths


def find(exp: Experiment) -> Yardstick | None:
    """The yardstick a run of `exp` evaluates on, or None without one."""
    return yardstick_of(exp.yardstick, exp.data, exp.source, training=True)


def yardstick_of(ys: YardstickConfig, data: DataConfig, source: str, training: bool) -> Yardstick | None:
    """For a training run (`training`), a parquet that is also a training input is refused and one not yet
    tokenized is prepared (Ray Data); for an evaluation, it must be prepared already (one line says how)."""
    if ys.path is None:
        return None
    path = Path(ys.path).resolve()  # absolute: the training workers open it where they run
    if path.suffix == ".bin":
        read_llmc(path)
        return Yardstick(ys.name, (str(path),), llmc=True, targets=ys.tokens)
    if training and path in {p.resolve() for p in resolve_paths(data.paths)}:
        raise YardstickError(f"{source}: yardstick.path = {path} is also in data.paths: the model trains on its "
                             "documents; give another shard")
    own = dataclasses.replace(data, paths=(str(path),))
    hit = prepare.cached(own, [inspect_file(path, own)])
    if hit is None and not training:
        raise YardstickError(f"{path}: the yardstick parquet is not tokenized under {own.cache_dir}: run `python -m "
                             f"fwray.prepare {source} data.paths=[{path}]` (or a training run of {source}) first")
    if hit is None:
        print(f"yardstick: tokenizing {path} into the token cache", flush=True)
        hit = prepare.prepare(Experiment(data=own, source=source))
    entry, manifest = hit
    files = [f for split in ("train", "val") for f in tokens.split_files(entry, manifest, split)]
    return Yardstick(ys.name, tuple(files), llmc=False, targets=ys.tokens, sha256=tokens.shard_hashes(manifest))


def on_this_node(yardstick: Yardstick, node_cache_dir: str | None) -> Yardstick:
    """The yardstick with its shards on this node's disk: fetched once from object storage, local files as they
    are."""
    return dataclasses.replace(yardstick, files=tuple(node_cache.local_files(yardstick.files, yardstick.sha256,
                                                                             node_cache_dir)))
