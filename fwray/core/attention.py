"""Causal attention that may also stay within each document (model.doc_mask) and within the last model.attn_window
keys (a sliding window). One rule, `allowed`, decides what a query sees; three paths run it:

- nothing beyond causality: SDPA with is_causal (no mask tensor, flash kernels): the model as it always was.
- a mask, on CUDA under torch.compile: FlexAttention with a BlockMask made once per forward and shared by every
  layer. Compiled, it skips the blocks of keys the mask rules out, so a window or short documents cost less than
  full causal attention.
- a mask anywhere else (the CPU, the uncompiled model that evaluation runs, dropout while training): SDPA with a
  dense (B, 1, T, T) boolean mask. Uncompiled FlexAttention materialises every score anyway, and has no dropout.

Documents: fwray puts an EOT before each document, so a token's document is the count of EOTs up to and including it
in the input window; the EOT belongs to the document it starts, and tokens before the window's first EOT (the tail of
a document begun earlier) are document 0.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F

from .tokens import EOT

try:  # torch >= 2.5; without it every mask takes the dense path
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - fwray's torch has it
    BlockMask = create_block_mask = flex_attention = None

# what GPT.hidden hands every block: None (causal only), a BlockMask (FlexAttention) or a dense boolean tensor
Mask = Union["BlockMask", torch.Tensor, None]


def document_ids(idx: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): each token's document within its window, counted by the EOTs that start documents."""
    return (idx == EOT).cumsum(dim=-1)


def allowed(docs: torch.Tensor | None, window: int) -> Callable:
    """mask_mod(b, h, q, k) -> True where query q of row b may attend key k: causal, within the document (docs given)
    and within the last `window` keys, the query's own included (window 0: no limit). Written for FlexAttention's
    scalar indices; broadcast index tensors give the dense mask from the same code."""

    def mask_mod(b, h, q, k):
        ok = q >= k
        if docs is not None:
            ok = ok & (docs[b, q] == docs[b, k])
        if window:
            ok = ok & (q - k < window)
        return ok

    return mask_mod


def uses_flex(device: torch.device, dropout: float) -> bool:
    """FlexAttention runs where it compiles to a fused kernel: CUDA, inside torch.compile, no attention dropout."""
    return (flex_attention is not None and device.type == "cuda" and torch.compiler.is_compiling()
            and dropout == 0.0)


def build_mask(idx: torch.Tensor, doc_mask: bool, window: int, flex: bool = False) -> Mask:
    """The mask every layer of one forward over `idx` (B, T) shares: None when only causality applies, else a
    BlockMask (flex) or a (B, 1, T, T) boolean tensor."""
    if not doc_mask and not window:
        return None
    B, T = idx.shape
    mask_mod = allowed(document_ids(idx) if doc_mask else None, window)
    if flex:
        return create_block_mask(mask_mod, B if doc_mask else None, None, T, T, device=idx.device)
    pos = torch.arange(T, device=idx.device)
    rows = torch.arange(B, device=idx.device)[:, None, None, None]
    zero = torch.zeros((), dtype=torch.long, device=idx.device)
    return mask_mod(rows, zero, pos[None, None, :, None], pos[None, None, None, :]).expand(B, 1, T, T)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of (B, H, T, D) queries, keys and values under `mask` (build_mask's), (B, H, T, D) out."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):  # autocast casts SDPA's inputs, not FlexAttention's: do it here
        low = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(low) for t in (q, k, v))
    return flex_attention(q, k, v, block_mask=mask)
