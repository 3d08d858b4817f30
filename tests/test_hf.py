"""The gpt2 recipe against an implementation no one here wrote: its weights, mapped by fwray.core.hf, give Hugging Face
transformers' GPT2LMHeadModel the same logits."""
import pytest
import torch

from fwray.config import ConfigError, ModelConfig
from fwray.core.hf import gpt2_state_dict_to_hf
from fwray.core.model import GPT

transformers = pytest.importorskip("transformers")  # the dev extra


@pytest.mark.parametrize("bias", [False, True])  # bias=False: GPT2's biases are zeros
def test_gpt2_recipe_matches_transformers_gpt2(bias):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, bias=bias)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    with torch.no_grad():  # every tensor random and large enough to matter (at GPT-2's init, biases are 0, norms 1
        for name, p in ours.named_parameters():  # and the activations so small that even tanh-GELU would pass)
            p.normal_(0.0, 0.1).add_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0)
    hf_config, hf_state = gpt2_state_dict_to_hf(ours.state_dict(), cfg)

    def hf_logits(**changes):
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**hf_config, **changes},
                                                                     attn_implementation="eager")).eval()
        model.load_state_dict(hf_state, strict=True)
        with torch.no_grad():
            return model(idx).logits

    idx = torch.randint(0, 50257, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours.lm_head(ours.hidden(idx))
        last = ours(idx)
    got = hf_logits()
    assert got.shape == want.shape == (3, cfg.block_size, cfg.vocab_size)
    # the same float32 model written twice (other matmul shapes and kernels): ~1e-6 apart on logits of size ~10;
    # gelu_new's tanh approximation, the nearest wrong model, is >1e-4 away
    assert (got - want).abs().max() <= 1e-4
    assert (got[:, -1] - last).abs().max() <= 1e-4  # forward's last-position logits too
    assert (hf_logits(activation_function="gelu_new") - want).abs().max() > 1e-4  # the comparison can fail


def test_only_the_gpt2_architecture_maps():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, recipe="modern")
    with pytest.raises(ConfigError, match="model.positions"):
        gpt2_state_dict_to_hf(GPT(cfg).state_dict(), cfg)
    # the init is no part of the architecture: a gpt2 model with zero-init projections maps
    zero = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, zero_init_proj=True)
    gpt2_state_dict_to_hf(GPT(zero).state_dict(), zero)
