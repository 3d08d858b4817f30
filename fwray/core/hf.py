"""fwray's gpt2 recipe in Hugging Face transformers' terms (GPT2LMHeadModel). Pure: transformers is not imported here;
the caller builds `GPT2LMHeadModel(GPT2Config(**config))` and loads the state (the tests do; an export will).
"""
from __future__ import annotations

import torch

from ..config import RECIPES, ConfigError, ModelConfig
from .tokens import EOT

# nn.Linear in fwray, Conv1D in transformers' GPT2: the same matrix stored transposed, (in, out)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # a row per token id


def gpt2_state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig,
                          vocab_size: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(GPT2Config keyword arguments, GPT2LMHeadModel state dict) for a model of the gpt2 architecture.

    The key names are the same (nanoGPT's are GPT-2's); the Conv1D weights are transposed; GPT2 always has biases, so
    a bias=False model's are zeros there. `vocab_size` keeps the embedding's (and tied head's) first rows only: the
    tokenizer's 50257 without the padding rows fwray adds for speed, which no text holds and fwray never samples.
    """
    for key, value in RECIPES["gpt2"].items():
        if not key.startswith("zero_init") and getattr(cfg, key) != value:  # the init is no part of the architecture
            raise ConfigError(f"model.{key} = {getattr(cfg, key)!r}: only the gpt2 architecture maps to "
                              f"GPT2LMHeadModel (it needs model.{key} = {value!r})")
    vocab_size = vocab_size or cfg.vocab_size
    hf_config = dict(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, activation_function="gelu",  # exact GELU, as nn.GELU; GPT2's default is tanh's
                     layer_norm_epsilon=1e-5,  # nn.LayerNorm's
                     resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                     tie_word_embeddings=True, bos_token_id=EOT, eos_token_id=EOT)
    hf = {k: (v.t() if k.endswith(_CONV1D) else v[:vocab_size] if k in _VOCAB_ROWS else v).contiguous()
          for k, v in state.items()}
    if not cfg.bias:
        C = cfg.n_embd
        widths = {"ln_1": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "ln_2": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
        zeros = {f"transformer.h.{i}.{name}.bias": w for i in range(cfg.n_layer) for name, w in widths.items()}
        zeros["transformer.ln_f.bias"] = C
        dtype = state["lm_head.weight"].dtype
        hf.update({k: torch.zeros(w, dtype=dtype) for k, w in zeros.items()})
    return hf_config, hf
