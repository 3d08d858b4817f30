"""The GPT of nanoGPT: pre-LayerNorm blocks, causal scaled-dot-product attention, tied embeddings.

The loss is computed in chunks of tokens with its gradients taken in the same pass, so the full (batch x block x
vocab) logits never exist and nothing is recomputed: evaluation at the training micro-batch costs no more than
training.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .tokens import EOT


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, loss_chunk_size: int = 4096, activation_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.loss_chunk_size = loss_chunk_size
        self.activation_checkpointing = activation_checkpointing
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm hidden states, (B, T, n_embd)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """With targets: the mean cross-entropy (a scalar). Without: logits of the last position, (B, vocab)."""
        h = self.hidden(idx)
        if targets is None:
            return self.lm_head(h[:, -1, :])
        return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.loss_chunk_size)

    def num_params(self) -> int:
        """Parameters counted once (the tied embedding once), position embeddings included, as nanoGPT's report."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, :50257].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (h @ weight.T) against targets, `chunk` rows at a time, with both gradients computed
    in the forward pass: no chunk's logits outlive it and none is recomputed in backward (6 x rows x C x V FLOPs,
    what plain autograd on the full logits costs). Matmuls follow the ambient autocast, as the model's do."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.size(0), chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk]
            logits = h_c @ weight.t()
            matmul_dtype = logits.dtype  # bf16 under autocast
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot, in place of the logits, then in the matmul dtype as
            # autograd's backward of the plain loss would have it
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, t_c[:, None], torch.full_like(lse[:, None], -1.0))
            grad = grad.to(matmul_dtype)
            del logits, lse
            grad_h[start:start + chunk] = (grad @ weight).to(h.dtype)
            grad_w += (grad.t() @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of (N, C) hidden states against (N,) targets, `chunk` rows of logits at a time.

    The full (N x vocab) logits never exist: with a 50K vocabulary they would be the largest tensor of a step
    (1.6 GB at 12 x 1024 tokens in fp32) and the usual out-of-memory at evaluation on a 12 GB card.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk) / targets.numel()
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.size(0), chunk):
        logits = h[start:start + chunk] @ weight.t()
        total = total + F.cross_entropy(logits.float(), targets[start:start + chunk], reduction="sum")
    return total / targets.numel()


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token, PaLM appendix B as nanoGPT: 6N + 12*L*H*Q*T, with N the parameters that multiply
    (position embeddings are looked up, not multiplied)."""
    head_dim = cfg.n_embd // cfg.n_head
    return 6 * (n_params - cfg.block_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.block_size


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


# ---------------------------------------------------------------- text in, text out (the sampler, and samples in training)


def encode_prompt(enc, prompt: str) -> list[int]:
    """Training documents start after an EOT, so a prompt does too: the model reads it as a document's start."""
    return [EOT] + enc.encode_ordinary(prompt)


@torch.no_grad()
def generate_text(model: GPT, enc, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, device: torch.device | str | None = None) -> str:
    """The prompt and its continuation, cut at the first generated EOT. Same model, prompt and seed: same text."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = torch.tensor([encode_prompt(enc, prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)[0].tolist()
    model.train(was_training)
    new = out[idx.size(1):]
    if EOT in new:
        new = new[:new.index(EOT)]
    return prompt + enc.decode(new)
