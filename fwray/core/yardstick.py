"""The yardstick: an extra validation set read from a local file, the same tokens for every run, so that its loss
compares across runs, recipes and other projects. Pure numpy + torch.

Two kinds of file hold it:
- llm.c's token file (llm.c dev/data/data_common.py `write_datafile`; modded-nanogpt reads the same): a header of
  256 little-endian int32 (magic 20240520, version 1, the token count), then that many uint16 GPT-2 tokens. FineWeb's
  `fineweb_val_000000.bin` is one: the set llm.c and modded-nanogpt report validation loss on.
- fwray token shards (a parquet tokenized by fwray.data.yardstick through the prepare cache).

It is read as llm.c reads it: windows of block_size + 1 tokens at stride block_size from the start (every token a
target once), the first `targets` targets in whole windows (llm.c and modded-nanogpt: the first 10,485,760), each
file on its own (no window crosses two files).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import FwrayError
from .loader import SplitTooSmall, TokenShards, read_shard
from .tokens import TOKEN_DTYPE

LLMC_MAGIC = 20240520  # llm.c's GPT-2 token files (its Llama 3 files, uint32 tokens, have another)
LLMC_VERSION = 1
LLMC_HEADER = np.dtype("<i4"), 256  # int32 entries: magic, version, token count, then zeros
REFERENCE_TARGETS = 10_485_760  # llm.c's and modded-nanogpt's validation budget: 10,240 windows of 1,024
WHERE_FROM = "the README's Yardstick section says where fineweb_val_000000.bin comes from"


class YardstickError(FwrayError):
    """A yardstick file that cannot be read as one: one line naming the file and the fix."""

    exit_code = 2


def read_llmc(path: str | os.PathLike) -> np.ndarray:
    """The tokens of an llm.c GPT-2 token file, memory-mapped after its header; a file that is not one is one line."""
    dtype, entries = LLMC_HEADER
    header_bytes = dtype.itemsize * entries
    size = os.path.getsize(path)
    if size < header_bytes:
        raise YardstickError(f"{path}: {size} bytes, shorter than llm.c's {header_bytes}-byte header: not an llm.c "
                             f"token file; {WHERE_FROM}")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype=dtype, count=3))
    if magic != LLMC_MAGIC:
        raise YardstickError(f"{path}: magic number {magic}, not llm.c's GPT-2 token file's {LLMC_MAGIC}: give a "
                             f"file in llm.c's format (.bin) or a parquet of documents; {WHERE_FROM}")
    if version != LLMC_VERSION:
        raise YardstickError(f"{path}: llm.c token file version {version}, fwray reads version {LLMC_VERSION} "
                             f"(uint16 GPT-2 tokens): write it again with llm.c's GPT-2 tools")
    expected = header_bytes + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise YardstickError(f"{path}: the header announces {count:,} tokens ({expected:,} bytes with the header) but "
                             f"the file has {size:,} bytes: truncated or damaged, download or copy it again")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=header_bytes, shape=(count,))


@dataclass(frozen=True)
class Yardstick:
    """Where the yardstick's tokens are and how many are read: picklable, so it travels to the training workers
    (absolute paths, as the token cache's), which open it there."""

    name: str
    files: tuple[str, ...]
    llmc: bool  # llm.c's token files; else fwray token shards
    targets: int | None = REFERENCE_TARGETS  # None: every whole window of the files
    sha256: dict[str, str] | None = None  # token shards on object storage: a shard's name -> its hash (node copies)

    def open(self, block_size: int, batch_size: int) -> "YardstickBatches":
        read = read_llmc if self.llmc else read_shard
        try:
            shards = TokenShards(self.files, block_size, read=read)
            windows = shards.epoch_layout(align_to_documents=False)
        except SplitTooSmall:  # not one window: said below, with the yardstick's own fix
            shards, windows = None, np.empty(0, dtype=np.int64)
        if self.targets is not None:
            windows = windows[:self.targets // block_size]
        if len(windows) == 0:
            held = sum(len(read(f)) for f in self.files)
            budget = f" and a budget of {self.targets:,} targets" if self.targets is not None else ""
            raise YardstickError(f"yardstick {self.name} ({', '.join(self.files)}): {held:,} tokens{budget} hold no "
                                 f"window of block_size + 1 = {block_size + 1} tokens: give a longer file"
                                 f"{' or raise yardstick.tokens' if budget else ''}")
        return YardstickBatches(shards, windows, batch_size)

    def describe(self, block_size: int) -> str:
        """One line: what is read, from where (tag fwray.yardstick, fwray.eval's line)."""
        kind = "llm.c token file" if self.llmc else "fwray token shards"
        where = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files in {Path(self.files[0]).parent}"
        windows = self.open(block_size, 1).num_windows
        return (f"{self.name}: {windows:,} windows x {block_size} = {windows * block_size:,} targets from the start "
                f"of {where} ({kind})")


class YardstickBatches:
    """The yardstick's windows in batches: batch i is windows [i * batch_size, (i + 1) * batch_size)."""

    def __init__(self, shards: TokenShards, windows: np.ndarray, batch_size: int):
        self.shards, self.windows, self.batch_size = shards, windows, batch_size
        self.num_windows = len(windows)
        self.num_batches = math.ceil(self.num_windows / batch_size)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shards.batch(self.windows[i * self.batch_size:(i + 1) * self.batch_size])
