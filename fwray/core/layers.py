"""The GPT's building blocks, each piece chosen by a model-section switch (see config.RECIPES).

gpt2: LayerNorm, GELU, attention over learned positions (added by the GPT). modern (nanochat, modded-nanogpt): RMSNorm
without a gain, ReLU^2, rotary positions and RMSNorm on queries and keys. Parameter names are nanoGPT's in both.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .attention import Mask, attend

RMS_EPS = 1e-6  # explicit: F.rms_norm's default is the input dtype's epsilon, 0.0078 for bf16 queries and keys
ROTARY_BASE = 10_000  # RoFormer's and nanochat's


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, bias=cfg.bias)
    return nn.RMSNorm(dim, eps=RMS_EPS, elementwise_affine=False)  # no gain: nothing to learn, nothing to decay


class Rotary(nn.Module):
    """cos and sin of (position x frequency), one frequency per pair of a head's channels. Buffers, not saved:
    nothing is learned, and they are rebuilt with the model (on the meta device too)."""

    def __init__(self, head_dim: int, block_size: int, base: float = ROTARY_BASE):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, head_dim / 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:T, None, :], self.sin[:T, None, :]  # (T, 1, head_dim / 2): broadcast over heads


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x[j], x[j + D/2]) of a (B, T, H, D) tensor by its position's angle, as the complex
    number x[j] + i x[j + D/2] times exp(i angle): a query-key product then depends on the positions' difference
    only. Half-split pairs (nanochat's, GPT-NeoX's) keep the two halves contiguous."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)  # fp32 tables: back to x's dtype


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention. With `value_embed`, each position's values are mixed with a value embedding of its
    token, lambda_0 v + lambda_1 ve, the two weights learned from 0.5 each (modded-nanogpt's record of 2025-01-04)."""

    def __init__(self, cfg: ModelConfig, value_embed: bool = False):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # unit-RMS queries and keys bound the attention logits (|q.k| / sqrt(D) <= sqrt(D)): no logit blow-up
        self.qk_norm = (nn.RMSNorm(cfg.n_embd // cfg.n_head, eps=RMS_EPS, elementwise_affine=False)
                        if cfg.qk_norm else None)
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if value_embed else None

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: Mask = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.c_attn(x).split(C, dim=2))
        if ve is not None:  # the table's fp32 lookup in the values' dtype (bf16 under autocast), as q and k are
            v = self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve.view_as(v).to(v.dtype)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q), self.qk_norm(k)
        if rotary is not None:  # a rotation keeps the RMS: norm then rotate equals rotate then norm
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class ReLUSquared(nn.Module):
    """relu(x)^2 (Primer, arXiv 2109.08668): sparse like ReLU, smooth at 0; ~1-2% better than GELU in
    modded-nanogpt."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        # r * r, not r.square(): square is pow, which CUDA autocast runs in fp32 (CPU autocast does not), so the MLP's
        # widest activation would be kept in fp32 on a GPU: +1.75 GB for the modern 9 x 640 model at micro-batch 20,
        # unseen by the CPU memory estimate. A product stays in bf16 under either autocast.
        return r * r


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.act = nn.GELU() if cfg.mlp == "gelu" else ReLUSquared()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, value_embed: bool = False):
        super().__init__()
        self.ln_1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, value_embed)
        self.ln_2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: Mask = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, mask, ve)
        return x + self.mlp(self.ln_2(x))


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) in fp32: logits bounded smoothly to (-cap, cap) (Gemma 2), so no token's logit runs
    away early in training. cap 0 leaves the logits alone (dtype included)."""
    if not cap:
        return logits
    return cap * torch.tanh(logits.float() / cap)
