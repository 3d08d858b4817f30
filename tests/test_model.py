"""The GPT: exact parameter counts (nanoGPT's figures) and the chunked loss (soft-capped or not) against plain
cross-entropy. The recipes' pieces are in test_recipe.py."""
import pytest
import torch
import torch.nn.functional as F

from fwray.config import ModelConfig as GPTConfig
from fwray.core.layers import softcap
from fwray.core.model import GPT, chunked_cross_entropy, count_params


def test_gpt2_124m_param_count():
    # nanoGPT's 124,337,664 is with GPT-2's own vocabulary of 50257 (wpe included, tied embedding counted once)
    assert count_params(GPTConfig(vocab_size=50257)) == 124_337_664
    # fwray's default pads the vocabulary to 50304 (a multiple of 64): 47 more rows of 768 = 36,096 more parameters
    assert count_params(GPTConfig()) == 124_373_760 == 124_337_664 + 47 * 768


def test_12l_8h_512d_param_count():
    cfg = GPTConfig(n_layer=12, n_head=8, n_embd=512, block_size=1024, vocab_size=50304, bias=False)
    assert count_params(cfg) == 64_041_472


def test_count_params_matches_a_real_model():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50304, bias=True)
    real = GPT(cfg)
    assert count_params(cfg) == real.num_params() == sum(p.numel() for p in real.parameters())
    assert real.lm_head.weight is real.transformer.wte.weight  # tied: counted once


# cap 3 against logits of std 4: most logits are well into tanh's bend, many saturated
@pytest.mark.parametrize("cap", [0.0, 3.0])
@pytest.mark.parametrize("n, chunk", [(12, 64), (12, 12), (13, 4), (40, 7)])  # one chunk, exact fit, many + ragged
def test_chunked_cross_entropy_matches_plain(n, chunk, cap):
    torch.manual_seed(0)
    vocab, dim = 101, 16
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))

    got = chunked_cross_entropy(h, w, targets, chunk, cap)
    got.backward()
    got_gh, got_gw = h.grad.clone(), w.grad.clone()
    h.grad, w.grad = None, None

    want = F.cross_entropy(softcap(h @ w.t(), cap), targets)  # plain autograd through the capped logits
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_gh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_gw, w.grad, rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # the evaluation path (no checkpointing) agrees too
        torch.testing.assert_close(chunked_cross_entropy(h, w, targets, chunk, cap), want.detach())


@pytest.mark.parametrize("cap", [0.0, 15.0])
def test_chunked_loss_recomputes_nothing(cap):
    """Forward and backward of the loss cost 6 x N x C x V matmul FLOPs, as plain autograd on full logits does:
    the gradients are taken chunk by chunk in the forward, no chunk's logits recomputed in backward."""
    from torch.utils.flop_counter import FlopCounterMode

    n, dim, vocab = 40, 16, 101
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        chunked_cross_entropy(h, w, torch.randint(0, vocab, (n,)), 7, cap).backward()
    assert counter.get_total_flops() == 6 * n * dim * vocab


@pytest.mark.parametrize("cap", [0.0, 3.0])
def test_chunked_loss_under_bf16_autocast_matches_plain(cap):
    torch.manual_seed(0)
    h = torch.randn(24, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h, w, targets, 5, cap)
        want = F.cross_entropy(softcap((h @ w.t()).float(), cap), targets)
    got_grads = torch.autograd.grad(got, (h, w))
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # bf16 matmuls on both sides


def test_model_loss_chunked_equals_unchunked():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304)
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (3, 16))
    y = torch.randint(0, 50257, (3, 16))
    grads, losses = [], []
    for chunk in (10_000, 5):  # 48 tokens: one chunk vs ten
        torch.manual_seed(1)
        model = GPT(cfg, loss_chunk_size=chunk)
        loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():  # the plain loss from the logits
            logits = model.lm_head(model.hidden(x))
            torch.testing.assert_close(loss.detach(), F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_generate_and_block_size_guard():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=50304)
    model = GPT(cfg).eval()
    out = model.generate(torch.zeros((1, 3), dtype=torch.long), max_new_tokens=10, temperature=0)
    assert out.shape == (1, 13) and int(out.max()) < 50257  # padded vocabulary rows are never sampled
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, 9), dtype=torch.long))
