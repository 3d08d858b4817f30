"""HellaSwag accuracy from a local jsonl file (the dataset's public format: `ctx`, or `ctx_a` + `ctx_b`; `endings`,
4 strings; `label`, the right ending's index). Pure: torch and tiktoken; nothing is downloaded, the file is the user's.

Scored as the GPT-2 reproductions score it (karpathy/llm.c dev/data/hellaswag.py, build-nanogpt's hellaswag.py,
"completion style"): each ending, with a space before it, follows the context; the model's losses on the ending's
tokens are summed (acc: the lowest sum wins) and averaged per token (acc_norm: the lowest mean wins). One difference:
the context starts after an EOT, as every document fwray trains on (and every fwray.sample prompt) does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FwrayError
from .model import GPT, encode_prompt

ENDINGS = 4


class HellaSwagError(FwrayError):
    """A file that is not HellaSwag's jsonl: one line naming the file, the line and what is wrong."""

    exit_code = 2


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, ...]
    label: int


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """The first `limit` (all) examples of a jsonl file; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if limit is not None and len(examples) == limit:
            break
        if line.strip():
            examples.append(_example(line, f"{path}:{number}"))
    if not examples:
        raise HellaSwagError(f"{path}: no examples (one JSON object a line)")
    return examples


def _example(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise HellaSwagError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: a JSON object with ctx, endings and label expected, got {type(row).__name__}")
    context = row.get("ctx")
    if context is None and isinstance(row.get("ctx_a"), str):  # the dataset's rule: ctx = ctx_a + " " + ctx_b
        context = f"{row['ctx_a']} {row['ctx_b']}" if row.get("ctx_b") else row["ctx_a"]
    if not isinstance(context, str):
        raise HellaSwagError(f"{where}: no context (a string ctx, or ctx_a and ctx_b)")
    endings = row.get("endings")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: endings must be a list of {ENDINGS} strings")
    label = row.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # exports of the Hugging Face dataset hold it as text
        label = int(label)
    if type(label) is not int or not 0 <= label < ENDINGS:
        raise HellaSwagError(f"{where}: label = {label!r}: must be the right ending's index, 0 to {ENDINGS - 1} "
                             "(the test split has no labels: use the validation split)")
    return Example(context, tuple(endings), label)


def render(enc, example: Example, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask), each (4, T): context + ending per row, the mask on the targets that are the ending's
    tokens. A row longer than the model's block keeps its last block_size + 1 tokens (the ending, and the context
    nearest it). Rows are padded at the end, where causal attention keeps the padding out of every scored target."""
    context = encode_prompt(enc, example.context)
    rows, scored = [], []
    for ending in example.endings:
        ending_tokens = enc.encode_ordinary(" " + ending)  # the space the context's last word leaves out
        rows.append((context + ending_tokens)[-(block_size + 1):])
        scored.append(min(len(ending_tokens), len(rows[-1]) - 1))
    width = max(len(r) for r in rows) - 1
    inputs = torch.zeros(ENDINGS, width, dtype=torch.long)
    targets = torch.zeros(ENDINGS, width, dtype=torch.long)
    mask = torch.zeros(ENDINGS, width, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(rows, scored)):
        inputs[i, :len(row) - 1] = torch.tensor(row[:-1])
        targets[i, :len(row) - 1] = torch.tensor(row[1:])
        mask[i, len(row) - 1 - n:len(row) - 1] = True
    return inputs, targets, mask


@torch.no_grad()
def ending_losses(model: GPT, enc, example: Example, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ending's summed and mean loss, nats (4,) each, on the CPU."""
    inputs, targets, mask = (t.to(device) for t in render(enc, example, model.config.block_size))
    losses = model.token_losses(inputs, targets) * mask
    sums = losses.sum(dim=1)
    return sums.cpu(), (sums / mask.sum(dim=1)).cpu()


def accuracy(model: GPT, enc, examples: list[Example], device: torch.device) -> dict[str, float]:
    """acc (lowest summed loss is the right ending) and acc_norm (lowest loss per token), over the examples."""
    was_training = model.training
    model.eval()
    right = right_norm = 0
    for example in examples:
        sums, means = ending_losses(model, enc, example, device)
        right += int(sums.argmin()) == example.label
        right_norm += int(means.argmin()) == example.label
    model.train(was_training)
    return {"examples": len(examples), "acc": right / len(examples), "acc_norm": right_norm / len(examples)}
