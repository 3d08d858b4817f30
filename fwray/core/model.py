"""The GPT of nanoGPT (pre-norm blocks, causal scaled-dot-product attention) and its recipes: gpt2 (learned positions,
LayerNorm, GELU, tied embeddings), modern or speedrun (config.RECIPES; the blocks are in fwray.core.layers).

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

from ..config import ModelConfig
from .attention import build_mask, uses_flex
from .layers import Block, Rotary, make_norm, softcap
from .tokens import EOT, VOCAB_SIZE


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, loss_chunk_size: int = 4096, activation_checkpointing: bool = False):
        super().__init__()
        self.config = cfg
        self.loss_chunk_size = loss_chunk_size
        self.activation_checkpointing = activation_checkpointing
        modules = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.positions == "learned":
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.embed_norm:
            modules["ln_e"] = make_norm(cfg, cfg.n_embd)
        self.value_tables = value_embed_tables(cfg)  # per layer: the value embedding table it reads, or None
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, table is not None) for table in self.value_tables]),
            ln_f=make_norm(cfg, cfg.n_embd),
        ))
        # modded-nanogpt's value embeddings: token tables of their own, each looked up once per forward and read by
        # two layers (value_embed_tables); embeddings like wte in their init and their optimizer group
        self.value_embeds = (nn.ModuleList([nn.Embedding(cfg.vocab_size, cfg.n_embd) for _ in range(cfg.value_embeds)])
                             if cfg.value_embeds else None)
        # modded-nanogpt's U-net (record 11): block i's output is added to block L-1-i's input, for i < L/2, weighted
        # by skip_weights[i] from 1 (a single block has no mirror: no skips)
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips and cfg.n_layer > 1 else None
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        # one table of rotary angles, shared by every layer
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size) if cfg.positions == "rotary" else None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if cfg.zero_init_proj:  # each block starts as the identity and grows in (modded-nanogpt, nanochat)
                    torch.nn.init.zeros_(p)
                else:  # GPT-2's scaled init of the residual projections
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.zero_init_head:  # every logit starts at 0: the first loss is ln(vocab), no random preference (nanochat)
            torch.nn.init.zeros_(self.lm_head.weight)

    def borrow(self, state: dict) -> "GPT":
        """Take `state`'s tensors as this model's own, without a copy and on their device: a model built on the meta
        device becomes a view of a training model's weights. The rotary table, a buffer no state dict holds, is
        rebuilt beside them."""
        # a plain dict drops the state dict's `_metadata`, which assign=True would otherwise mark for its owner too
        self.load_state_dict(dict(state), assign=True)
        if self.rotary is not None and self.rotary.cos.is_meta:
            with torch.device(next(iter(state.values())).device):
                self.rotary = Rotary(self.config.n_embd // self.config.n_head, self.config.block_size)
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states, (B, T, n_embd)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rotary = self.rotary(T) if self.rotary is not None else None  # positions rotate queries and keys...
        if rotary is None:  # ...or are added to the input
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        if self.config.embed_norm:  # the residual stream starts at unit RMS, whatever scale the embedding has grown to
            x = self.transformer.ln_e(x)
        x = self.transformer.drop(x)
        # one mask per forward, shared by every layer (None: causal only)
        mask = build_mask(idx, self.config.doc_mask, self.config.attn_window,
                          flex=uses_flex(idx.device, self.config.dropout if self.training else 0.0))
        values = [table(idx) for table in self.value_embeds] if self.value_embeds is not None else []
        L, skips = self.config.n_layer, []
        for i, block in enumerate(self.transformer.h):
            if self.skip_weights is not None and i >= L - len(self.skip_weights):  # the second half's mirror image
                x = x + self.skip_weights[L - 1 - i] * skips[L - 1 - i]
            ve = values[self.value_tables[i]] if self.value_tables[i] is not None else None
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rotary, mask, ve, use_reentrant=False)
            else:
                x = block(x, rotary, mask, ve)
            if self.skip_weights is not None and i < len(self.skip_weights):
                skips.append(x)
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states, soft-capped as the model's loss sees them (tests and benchmarks use it)."""
        return softcap(self.lm_head(h), self.config.logit_softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """With targets: the mean cross-entropy (a scalar). Without: logits of the last position, (B, vocab)."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h[:, -1, :])
        return chunked_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.loss_chunk_size,
                                     self.config.logit_softcap)

    def token_losses(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of every target, (B, T) in fp32, for evaluation (call it under torch.no_grad): what the
        validation loss, bits per byte and HellaSwag's per-ending scores are sums of."""
        h = self.hidden(idx)
        return chunked_token_losses(h.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.loss_chunk_size,
                                    self.config.logit_softcap).view(targets.shape)

    def num_params(self) -> int:
        """Parameters counted once (a tied embedding once), position embeddings included, as nanoGPT's report."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, :VOCAB_SIZE].float()  # no padding id
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
    """Summed cross-entropy of softcap(h @ weight.T) against targets, `chunk` rows at a time, with both gradients
    computed in the forward pass: no chunk's logits outlive it and none is recomputed in backward (6 x rows x C x V
    FLOPs, what plain autograd on the full logits costs). Matmuls follow the ambient autocast, as the model's do."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                cap: float) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.size(0), chunk):
            h_c, t_c = h[start:start + chunk], targets[start:start + chunk]
            logits = h_c @ weight.t()
            matmul_dtype = logits.dtype  # bf16 under autocast
            logits = logits.float()
            if cap:  # logits = cap * tanh(z / cap), whose derivative 1 - tanh^2 the chain rule needs below (in fp32:
                # near saturation 1 - tanh^2 cancels); one more chunk of fp32 logits while it lives
                dcap = logits.div_(cap).tanh_()
                logits = dcap * cap
                dcap.square_().neg_().add_(1)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            # d(sum of losses)/d(logits) = softmax - one_hot, in place of the logits, then in the matmul dtype as
            # autograd's backward of the plain loss would have it
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, t_c[:, None], torch.full_like(lse[:, None], -1.0))
            if cap:
                grad.mul_(dcap)
                del dcap
            grad = grad.to(matmul_dtype)
            del logits, lse
            grad_h[start:start + chunk] = (grad @ weight).to(h.dtype)
            grad_w += (grad.t() @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          cap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of (N, C) hidden states against (N,) targets, `chunk` rows of logits at a time, the logits
    soft-capped at `cap` (layers.softcap; 0 = off).

    The full (N x vocab) logits never exist: with a 50K vocabulary they would be the largest tensor of a step
    (1.6 GB at 12 x 1024 tokens in fp32) and the usual out-of-memory at evaluation on a 12 GB card.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, cap) / targets.numel()
    return chunked_token_losses(h, weight, targets, chunk, cap).sum() / targets.numel()


def chunked_token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                         cap: float = 0.0) -> torch.Tensor:
    """(N,) fp32 cross-entropy of each row of (N, C) hidden states against its target, `chunk` rows of soft-capped
    logits at a time and no gradient: the loss without training's backward pass."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=h.device)
    for start in range(0, h.size(0), chunk):
        logits = (h[start:start + chunk] @ weight.t()).float()
        if cap:  # in place: no second chunk of logits
            logits.div_(cap).tanh_().mul_(cap)
        out[start:start + chunk] = F.cross_entropy(logits, targets[start:start + chunk], reduction="none")
    return out


def value_embed_tables(cfg: ModelConfig) -> list[int | None]:
    """Which value embedding table each layer reads (None: none): table i feeds layer i and layer L - n + i, the first
    and the last n layers (modded-nanogpt's "012 ... 012" pattern, which improved there on mirrored tables)."""
    L, n = cfg.n_layer, cfg.value_embeds
    return [i if i < n else i - (L - n) if i >= L - n else None for i in range(L)]


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token, PaLM appendix B as nanoGPT: 6N + 12*L*H*Q*T (T = block_size; attention counted
    without the causal half, as FlopCounterMode counts it).

    N is the weights that multiply in a matmul: every Linear's, the head included (a tied embedding counts there,
    once). Not in N: input embeddings, which are looked up (wpe; wte when untied; value embeddings), and elementwise
    parameters (norm gains, biases, the value and skip weights), which add no matmul FLOPs."""
    C, L = cfg.n_embd, cfg.n_layer
    lookups = ((cfg.block_size * C if cfg.positions == "learned" else 0)
               + (0 if cfg.tie_embeddings else cfg.vocab_size * C) + cfg.value_embeds * cfg.vocab_size * C)
    mixing = 2 * sum(t is not None for t in value_embed_tables(cfg)) + (L // 2 if cfg.unet_skips else 0)
    norms = 2 * L + 1 + (1 if cfg.embed_norm else 0)
    norm_params = norms * C * (2 if cfg.bias else 1) if cfg.norm == "layernorm" else 0  # rmsnorm has none
    biases = L * (3 * C + C + 4 * C + C) if cfg.bias else 0  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    matmul_params = n_params - lookups - norm_params - biases - mixing
    return 6 * matmul_params + 12 * L * cfg.n_head * (C // cfg.n_head) * cfg.block_size


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        return GPT(cfg).num_params()


# ---------------------------------------------------------------- text in, text out (the sampler, and samples in training)


def encode_prompt(enc, prompt: str) -> list[int]:
    """Training documents start after an EOT, so a prompt does too: the model reads it as a document's start."""
    return [EOT] + enc.encode_ordinary(prompt)


# how fwray generates unless told otherwise: fwray sample, the served MLflow model, a run's samples
DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_SEED = 100, 0.8, 200, 1337


@torch.no_grad()
def generate_text(model: GPT, enc, prompt: str, max_new_tokens: int, temperature: float = DEFAULT_TEMPERATURE,
                  top_k: int | None = DEFAULT_TOP_K, seed: int = DEFAULT_SEED,
                  device: torch.device | str | None = None) -> str:
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
