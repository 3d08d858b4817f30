"""Bits per byte: the validation loss in a unit that does not depend on the tokenizer. Pure: no torch.

The convention is nanochat's `evaluate_bpb` (and how lm-evaluation-harness scores documents for its bits_per_byte):
only the text counts. Every document is stored as EOT + its tokens; as a target, that EOT is the end of the document
before it, which is no text and has no bytes, so its loss is left out of the nats and it is no token of the ratio:

    bpb = (mean nats per text target / ln 2) x (text tokens / UTF-8 bytes)

The nats are the mean over the evaluated windows' targets that are not EOT (`engine.ValLoss.text_loss`). The tokens
and the bytes are over the same text, the whole split: its tokens less one EOT per document, and the UTF-8 bytes of
those documents' text, which prepare counts (manifest `splits.<split>.bytes`). GPT-2's byte-level BPE spells every
byte exactly once, so the two describe the same bytes. The loss of sampled windows against the split's ratio is an
estimate of the split's bpb in the way val_loss is of its loss; nanochat counts the bytes of the very targets scored.
"""
from __future__ import annotations

import math


def text_counts(manifest: dict, split: str = "val") -> tuple[int, int] | None:
    """(text tokens, UTF-8 bytes) of a split, or None for a manifest prepared before fwray counted bytes (its runs
    and evaluations leave bpb out) or a split without text."""
    s = manifest["splits"][split]
    if not s.get("bytes"):
        return None
    return s["tokens"] - s["documents"], s["bytes"]


def bits_per_byte(nats_per_token: float, text_tokens: int, text_bytes: int) -> float:
    """Nats per text token -> bits per UTF-8 byte of the same text."""
    return nats_per_token / math.log(2) * text_tokens / text_bytes
