"""model.doc_mask and model.attn_window (fwray.core.attention): the mask against a hand-written one, what a token can
and cannot see through a whole model, FlexAttention against the dense SDPA path, and the switches through
compile, backward, a checkpoint, the memory estimate and the config."""
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fwray import config
from fwray.config import ConfigError, ModelConfig, TrainConfig
from fwray.core import checkpoint, memory
from fwray.core.attention import attend, build_mask, document_ids
from fwray.core.model import GPT
from fwray.core.tokens import EOT

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, recipe="modern")


def model_of(**switches) -> GPT:
    """A tiny modern model with no zero weight: zero-init projections would leave attention out of the output and
    every what-can-it-see test would pass trivially."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY, **switches), loss_chunk_size=12).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model


def tokens(T: int, seed: int = 0, b: int = 1) -> torch.Tensor:
    """Random ids without EOT (EOTs are placed by the tests)."""
    return torch.randint(0, EOT, (b, T), generator=torch.Generator().manual_seed(seed))


def test_dense_mask_is_the_hand_written_one():
    idx = torch.tensor([[11, 12, EOT, 13, 14, EOT, 15, 16]])  # a document's tail, then two documents
    assert document_ids(idx).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2]]  # the EOT starts its document
    doc = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    window_2 = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-2)
    assert torch.equal(build_mask(idx, doc_mask=True, window=0), doc[None, None])
    assert torch.equal(build_mask(idx, doc_mask=False, window=2), window_2[None, None])
    assert torch.equal(build_mask(idx, doc_mask=True, window=2), (doc & window_2)[None, None])
    assert build_mask(idx, doc_mask=False, window=0) is None  # causal only: no mask at all
    two_rows = torch.cat([idx, idx.flip(1)])  # each row its own documents
    assert torch.equal(build_mask(two_rows, True, 0)[1, 0], build_mask(idx.flip(1), True, 0)[0, 0])


def test_switches_off_make_the_causal_sdpa_call_of_before():
    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                calls.append(kwargs)
            return func(*args, **(kwargs or {}))

    with Record(), torch.no_grad():
        model_of()(tokens(16))
    assert len(calls) == 2
    assert all(kw["is_causal"] is True and kw.get("attn_mask") is None for kw in calls)


def test_doc_mask_hides_the_previous_document():
    x = tokens(16)
    x[0, 0], x[0, 7] = EOT, EOT  # documents at 0..6 and 7..15
    changed = x.clone()
    changed[0, 1:7] = tokens(6, seed=1)[0]  # another first document, as long

    def hidden(model, idx):
        with torch.no_grad():
            return model.hidden(idx)

    masked = model_of(doc_mask=True)
    torch.testing.assert_close(hidden(masked, changed)[:, 7:], hidden(masked, x)[:, 7:], rtol=0, atol=1e-6)
    assert not torch.allclose(hidden(masked, changed)[:, 1:7], hidden(masked, x)[:, 1:7])
    plain = model_of()  # the control: without the switch the second document reads the first
    assert not torch.allclose(hidden(plain, changed)[:, 7:], hidden(plain, x)[:, 7:], atol=1e-4)


def test_window_bounds_what_each_layer_reaches_back():
    # 2 layers of window 3: a token reaches back 2 keys per layer, 4 in all; position 2's token reaches 6, not 7
    model, x = model_of(attn_window=3), tokens(16)
    changed = x.clone()
    changed[0, 2] = (x[0, 2] + 1) % EOT
    with torch.no_grad():
        before, after = model.hidden(x), model.hidden(changed)
    torch.testing.assert_close(after[:, 7:], before[:, 7:], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 6], before[:, 6], atol=1e-4)


# uncompiled FlexAttention says it is unfused; on a CPU that is the point: torch's reference, checked here
UNFUSED = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@UNFUSED
@pytest.mark.parametrize("doc_mask, window", [(True, 0), (False, 37), (True, 37)])
def test_flex_attention_equals_the_dense_path(doc_mask, window):
    # 200 tokens: not a whole number of FlexAttention's 128-token blocks; rows with documents of their own. Forward
    # only: torch 2.13 has no FlexAttention backward on a CPU (its gradients are a GPU check)
    B, H, T, D = 2, 3, 200, 16
    idx = tokens(T, b=B)
    idx[0, 50], idx[1, 130], idx[1, 131] = EOT, EOT, EOT
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    dense = attend(q, k, v, build_mask(idx, doc_mask, window))
    flex = attend(q, k, v, build_mask(idx, doc_mask, window, flex=True))
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


@UNFUSED
def test_the_flex_path_compiles_without_a_graph_break():
    idx = tokens(64)
    idx[0, 20] = EOT
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))

    def masked_attention(idx, q, k, v):
        return attend(q, k, v, build_mask(idx, True, 24, flex=True))

    compiled = torch.compile(masked_attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(idx, q, k, v), masked_attention(idx, q, k, v), rtol=0, atol=1e-6)


def test_masked_model_trains_compiles_and_checkpoints_its_switches(tmp_path):
    model = model_of(doc_mask=True, attn_window=5)
    model.activation_checkpointing = True  # the mask reaches blocks that are recomputed too
    x = tokens(17)
    x[0, 3] = x[0, 9] = EOT
    model.train()
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:, :-1], x[:, 1:]), model(x[:, :-1], x[:, 1:]), rtol=1e-5, atol=1e-5)
    exp = config.Experiment(model=model.config)
    checkpoint.save_model(tmp_path, exp, model.state_dict(), step=1, val_loss=None)
    loaded, _ = checkpoint.load_model(tmp_path)
    assert loaded.config.doc_mask is True and loaded.config.attn_window == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:, :-1]), model(x[:, :-1]), rtol=0, atol=0)


def test_memory_estimate_runs_with_the_mask_on():
    cfg = ModelConfig(**{**TINY, "block_size": 32}, doc_mask=True, attn_window=8)
    train = TrainConfig(batch_size=2, max_iters=10, compile=False, loss_chunk_size=64,
                        **config.RECIPE_TRAINING["modern"]["train"])
    estimate = memory.estimate_peak_bytes(cfg, train, 4)
    assert estimate["reserved"] > estimate["peak"] > 0


@pytest.mark.parametrize("key, value", [("attn_window", -1), ("attn_window", 2.5), ("attn_window", True),
                                        ("doc_mask", "yes")])
def test_bad_switches_are_one_line_errors(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        ModelConfig(**TINY, **{key: value})
    assert ModelConfig(**TINY).doc_mask is False and ModelConfig().attn_window == 0  # off in the recipes
