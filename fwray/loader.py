"""Batches from memory-mapped token shards. Pure numpy + torch.

Every batch is a function of (seed, step, micro-step, rank): a resumed run reads exactly the batches an
uninterrupted run would have read, with no loader state to save. A step's global batch does not depend on how it
is split between workers and accumulation: worker `rank`'s micro-step m is global micro-batch m * world_size + rank,
so 2 workers x 1 micro-step read the same sequences as 1 worker x 2 micro-steps.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import FwrayError
from .tokens import TOKEN_DTYPE

_TRAIN, _VAL = 0, 1


class SplitTooSmall(FwrayError):
    """A split holds no window of block_size + 1 tokens."""

    exit_code = 2


class TokenShards:
    """Random (block_size + 1)-token windows over one split's shard files, none crossing a file boundary."""

    def __init__(self, files: list[str | os.PathLike], block_size: int):
        self.block_size = block_size
        self.shards = [np.memmap(f, dtype=TOKEN_DTYPE, mode="r") for f in files if os.path.getsize(f) > 0]
        windows = [max(0, len(s) - block_size) for s in self.shards]
        self.cum_windows = np.cumsum(windows)
        self.num_tokens = sum(len(s) for s in self.shards)
        if not self.shards or self.cum_windows[-1] == 0:
            names = ", ".join(Path(f).name for f in files) or "no files"
            raise SplitTooSmall(f"the split ({names}) holds {self.num_tokens} tokens, fewer than block_size + 1 = "
                             f"{block_size + 1}: use more data, a larger data.val_fraction or a smaller block_size")

    def windows(self, starts: np.ndarray) -> np.ndarray:
        """(len(starts), block_size + 1) int64 windows for global window indices `starts`."""
        shard_idx = np.searchsorted(self.cum_windows, starts, side="right")
        out = np.empty((len(starts), self.block_size + 1), dtype=np.int64)
        for row, (s, g) in enumerate(zip(shard_idx, starts)):
            local = g - (self.cum_windows[s - 1] if s > 0 else 0)
            out[row] = self.shards[s][local: local + self.block_size + 1]
        return out

    def sample(self, batch_size: int, seed_parts: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(list(seed_parts))
        w = self.windows(rng.integers(0, self.cum_windows[-1], size=batch_size))
        # contiguous inputs and targets: a pinned copy of a strided view would stage through pageable memory and
        # make the host-to-device copy synchronous
        return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))


class Batches:
    """The train and validation batches of one run, deterministic in (seed, step, micro_step, rank, world_size)."""

    def __init__(self, train: TokenShards, val: TokenShards, batch_size: int, seed: int, rank: int = 0,
                 eval_batch_size: int | None = None, world_size: int = 1):
        self.train, self.val = train, val
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @classmethod
    def from_files(cls, train_files, val_files, block_size: int, **kwargs) -> "Batches":
        return cls(TokenShards(train_files, block_size), TokenShards(val_files, block_size), **kwargs)

    def train_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        global_micro = micro_step * self.world_size + self.rank
        return self.train.sample(self.batch_size, (self.seed, _TRAIN, step, global_micro))

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th validation batch: the same windows at every evaluation and for any number of workers (the
        engine shares the indices out between ranks), so val losses compare across steps and runs."""
        return self.val.sample(self.eval_batch_size, (self.seed, _VAL, i))
