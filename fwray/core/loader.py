"""Batches from memory-mapped token shards. Pure numpy + torch.

Every batch is a function of (seed, step, micro-step, rank, world_size): a resumed run reads exactly the batches an
uninterrupted run would have read, with no loader state to save. A step's global batch does not depend on how it
is split between workers and accumulation: worker `rank`'s micro-step m is global micro-batch m * world_size + rank,
so 2 workers x 1 micro-step read the same sequences as 1 worker x 2 micro-steps.

Training windows (data.sampling, data.align_to_documents):
- random: every micro-batch draws (block_size + 1)-token windows at any offset, with replacement. After k epochs'
  worth of windows a fraction ~e^-k of the tokens was never a target (1.8% after 4) and 21% were one 6+ times.
- epoch: windows laid out at stride block_size (a window's last token is the next one's first, so every token is a
  target exactly once per epoch and none is only ever an input), read once each per epoch in a permutation drawn
  from (seed, epoch). Sample g of the run, counting rows within micro-batches within global micro-batches
  (step * accumulation * world_size + m * world_size + rank), is position g % N of epoch g // N.
- align_to_documents: windows start at document starts (the EOT before each document) instead. Documents are
  packed in order: a window reads on from its start across the documents that fit; the next window starts at the
  last document start it read, so a document cut by a window's end is read again, whole, from its start. A
  document longer than a window continues in windows at stride block_size from its start (the only windows that
  start mid-document). Every token is read, every document from its start; the price is the re-read starts of the
  cut documents: ~1.25x the windows of the stride layout for FineWeb-like lengths at block_size 1024 (one window
  per document start instead would cost ~2x).
No window crosses a shard file boundary. Validation always reads random windows at any offset, fixed by
(seed, i): the same windows for every run and sampling setting, so val losses compare.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import SAMPLINGS
from ..errors import FwrayError
from .tokens import EOT, TOKEN_DTYPE, VOCAB_SIZE

_TRAIN, _VAL, _EPOCH = 0, 1, 2  # random streams: train draws, validation draws, epoch permutations
_SCAN_CHUNK = 1 << 26  # tokens per EOT scan: a 128 MB read, a 64 MB mask


class SplitTooSmall(FwrayError):
    """A split holds no window of block_size + 1 tokens."""

    exit_code = 2


class TokenShards:
    """(block_size + 1)-token windows over one split's shard files, none crossing a file boundary.

    A window is named by its global index: offset o of shard s is cum_windows[s - 1] + o, for every offset whose
    window fits in its shard.
    """

    def __init__(self, files: list[str | os.PathLike], block_size: int,
                 read: Callable[[str | os.PathLike], np.ndarray] | None = None):
        """`read` maps a file to its tokens (default: an fwray shard, memory-mapped); fwray.core.yardstick reads
        llm.c's token files through it."""
        self.block_size = block_size
        self.names = ", ".join(Path(f).name for f in files) or "no files"
        self.shards = [s for s in map(read or read_shard, files) if len(s) > 0]
        windows = [max(0, len(s) - block_size) for s in self.shards]
        self.cum_windows = np.cumsum(windows)
        self.num_tokens = sum(len(s) for s in self.shards)
        if not self.shards or self.cum_windows[-1] == 0:
            raise SplitTooSmall(f"the split ({self.names}) holds {self.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{block_size + 1}: use more data, a larger data.val_fraction or a smaller block_size")

    def windows(self, starts: np.ndarray) -> np.ndarray:
        """(len(starts), block_size + 1) int64 windows for global window indices `starts`."""
        shard_idx = np.searchsorted(self.cum_windows, starts, side="right")
        out = np.empty((len(starts), self.block_size + 1), dtype=np.int64)
        for row, (s, g) in enumerate(zip(shard_idx, starts)):
            local = g - (self.cum_windows[s - 1] if s > 0 else 0)
            out[row] = self.shards[s][local: local + self.block_size + 1]
        return out

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows `starts`."""
        return inputs_and_targets(torch.from_numpy(self.windows(starts)))

    def epoch_layout(self, align_to_documents: bool) -> np.ndarray:
        """The global indices, ascending, of the windows one epoch reads (the module docstring has both layouts)."""
        parts = [np.empty(0, dtype=np.int64)]
        for s, shard in enumerate(self.shards):
            last = len(shard) - self.block_size - 1  # the last offset whose window fits in the shard
            if last < 0:
                continue
            offsets = (document_windows(shard, self.block_size) if align_to_documents
                       else np.arange(0, last + 1, self.block_size, dtype=np.int64))
            parts.append(offsets[offsets <= last] + (self.cum_windows[s - 1] if s > 0 else 0))
        layout = np.concatenate(parts)
        if len(layout) == 0:  # only with align_to_documents: a fitting window always exists otherwise
            raise SplitTooSmall(f"the split ({self.names}) holds no document start (EOT {EOT}) with block_size + 1 = "
                               f"{self.block_size + 1} tokens after it: these are not fwray token shards, or "
                               f"data.align_to_documents needs more data")
        return layout


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """An fwray shard's tokens, memory-mapped (an empty file, which memmap refuses, as no tokens)."""
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


SPLIT_NAMES = {"train": "training", "val": "validation"}


def check_split(manifest: dict, split: str, block_size: int, source: str) -> None:
    """From the manifest's counts alone (no shard read): a split whose shards hold no window of block_size + 1 tokens
    (TokenShards' rule) is one line that names the split, the documents it received, and the setting that fixes it
    (`source`: the experiment file, for the message)."""
    if not any(f["tokens"] > block_size for f in manifest["splits"][split]["files"]):
        got = manifest["splits"][split]
        documents = sum(s["documents"] for s in manifest["splits"].values())
        fix = (f"raise data.val_fraction (now {manifest.get('val_fraction')}: about 1 document in "
               f"{1 / manifest['val_fraction']:,.0f} goes to validation)" if split == "val" and
               manifest.get("val_fraction") else "give more data (data.paths)")
        raise SplitTooSmall(f"{source}: the {SPLIT_NAMES[split]} split got {got['documents']:,} of the data's "
                            f"{documents:,} documents, {got['tokens']:,} tokens, fewer than one window of "
                            f"block_size + 1 = {block_size + 1}: {fix}, or lower model.block_size")


def document_starts(tokens: np.ndarray) -> np.ndarray:
    """Positions of EOT in `tokens`, scanned in chunks so a 0.7B-token memmap needs no 0.7 GB mask."""
    return np.concatenate([np.empty(0, dtype=np.int64)] +
                          [np.flatnonzero(tokens[i: i + _SCAN_CHUNK] == EOT) + i
                           for i in range(0, len(tokens), _SCAN_CHUNK)])


def document_windows(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """Window offsets aligned to documents, ascending (the rule is in the module docstring).

    From a window start d at a document start, ceil(L / block_size) windows at stride block_size read that
    document of L tokens to its end (its EOT included, it predicts L targets: its tokens, then the next EOT); the
    next window starts at the last document start those windows read. Tokens before the first EOT are no document.
    """
    starts = document_starts(tokens)
    per_doc = -(-np.diff(starts, append=len(tokens)) // block_size)
    reach = starts + per_doc * block_size  # the last target that a document's windows read
    after = (np.searchsorted(starts, reach, side="right") - 1).tolist()  # the last document start among them
    chain, i = [], 0
    while i < len(starts):  # the documents that windows start at: each depends on the one before (~0.1 s per 1M)
        chain.append(i)
        i = after[i] if after[i] > i else len(starts)
    count = per_doc[chain]
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # a window's number in its document
    return np.repeat(starts[chain], count) + k * block_size


class Batches:
    """The train and validation batches of one run, deterministic in (seed, step, micro_step, rank, world_size).

    `accumulation` (micro-steps per optimizer step) places a micro-batch in the run's sequence of samples, which
    epoch sampling needs; random sampling draws per (step, global micro-batch) and ignores it.
    """

    def __init__(self, train: TokenShards, val: TokenShards, batch_size: int, seed: int, rank: int = 0,
                 eval_batch_size: int | None = None, world_size: int = 1, sampling: str = "random",
                 align_to_documents: bool = False, accumulation: int = 1):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling = {sampling!r}: must be {' or '.join(SAMPLINGS)}")
        self.train, self.val = train, val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.sampling, self.accumulation = sampling, accumulation
        # the windows training reads; None: every offset (random sampling's layout since the start)
        self.layout = (train.epoch_layout(align_to_documents) if sampling == "epoch" or align_to_documents
                       else None)
        self.num_windows = len(self.layout) if self.layout is not None else int(train.cum_windows[-1])
        self._orders: dict[int, np.ndarray] = {}

    @classmethod
    def from_files(cls, train_files, val_files, block_size: int, **kwargs) -> "Batches":
        return cls(TokenShards(train_files, block_size), TokenShards(val_files, block_size), **kwargs)

    def train_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        global_micro = micro_step * self.world_size + self.rank
        if self.sampling == "random":
            picks = _draw((self.seed, _TRAIN, step, global_micro), self.num_windows, self.batch_size)
        else:
            if not 0 <= micro_step < self.accumulation:  # or two steps would read the same samples
                raise ValueError(f"micro-step {micro_step} of {self.accumulation}: pass the run's gradient "
                                 f"accumulation steps as Batches(accumulation=...)")
            first = (step * self.accumulation * self.world_size + global_micro) * self.batch_size
            picks = self._epoch_positions(first + np.arange(self.batch_size))
        return self.train.batch(picks if self.layout is None else self.layout[picks])

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th validation batch: the same windows at every evaluation and for any number of workers (the
        engine shares the indices out between ranks), so val losses compare across steps and runs."""
        return val_batch(self.val, self.seed, i, self.eval_batch_size)

    def epochs_read(self, windows: int) -> float:
        """Passes over the training data once `windows` windows are read (every worker's): windows / windows in the
        layout one epoch reads, or, for random windows at any offset, tokens read / tokens held. With
        data.align_to_documents an epoch holds more windows than tokens / block_size (a document's last window is
        partly the next one's), so the epoch is counted in windows, as the sampler reads them."""
        if self.layout is None:
            return windows * self.train.block_size / self.train.num_tokens
        return windows / len(self.layout)

    def _epoch_positions(self, samples: np.ndarray) -> np.ndarray:
        """Layout positions of run samples: sample g is entry g % N of epoch g // N's permutation."""
        epochs, positions = np.divmod(samples, self.num_windows)
        out = np.empty_like(samples)
        for e in np.unique(epochs):  # one epoch, or two when the batch straddles a boundary
            rows = epochs == e
            out[rows] = self._order(int(e))[positions[rows]]
        return out

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation, a pure function of (seed, epoch); the last two are cached (a batch may
        straddle an epoch boundary), so a run draws each once per worker."""
        if epoch not in self._orders:
            if len(self._orders) == 2:
                del self._orders[min(self._orders)]
            rng = np.random.default_rng([self.seed, _EPOCH, epoch])
            self._orders[epoch] = rng.permutation(self.num_windows)
        return self._orders[epoch]


def inputs_and_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of (rows, block_size + 1) token windows, each contiguous: a pinned copy of a strided view
    would stage through pageable memory and make the host-to-device copy synchronous."""
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def random_batch(batch_size: int, block_size: int, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random GPT-2 tokens laid out as the loader's: what memory and speed are measured on (neither
    depends on the values)."""
    return inputs_and_targets(torch.randint(0, VOCAB_SIZE, (batch_size, block_size + 1), device=device))


def val_batch(val: TokenShards, seed: int, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The i-th validation batch of a run with `seed`, from the validation split alone (fwray.eval reads a finished
    run's batches without its train split)."""
    return val.batch(_draw((seed, _VAL, i), int(val.cum_windows[-1]), batch_size))


def _draw(seed_parts: tuple[int, ...], n: int, size: int) -> np.ndarray:
    return np.random.default_rng(list(seed_parts)).integers(0, n, size=size)
