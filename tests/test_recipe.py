"""model.recipe and its switches: resolution and validation, exact parameter counts and FLOPs for every combination,
each modern piece against its plain definition, and the modern model (and speedrun's value embeddings and U-net
skips) through compile, checkpointing, autocast, the memory estimate and a checkpoint round trip."""
import dataclasses
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from fwray import config
from fwray.config import RECIPES, ConfigError, ModelConfig, TrainConfig
from fwray.core import checkpoint, memory
from fwray.core.layers import Rotary, apply_rotary
from fwray.core.model import GPT, count_params, flops_per_token

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)
SWITCHES = list(RECIPES["gpt2"])  # positions, norm, qk_norm, mlp, tie_embeddings, zero_init_proj/head, logit_softcap...


def modern(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, "recipe": "modern", **changes})


def speedrun(**changes) -> ModelConfig:
    return ModelConfig(**{**TINY, "recipe": "speedrun", **changes})


def skipping() -> ModelConfig:
    """Value embeddings and U-net skips on, 3 layers: the first and last read the table, the middle one neither
    reads a table nor takes a skip."""
    return speedrun(n_layer=3, value_embeds=1, unet_skips=True)


def batch(cfg: ModelConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (b, cfg.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------- the config


def test_recipes_resolve_their_defaults_and_one_override_changes_one_switch():
    assert {k: getattr(ModelConfig(), k) for k in SWITCHES} == RECIPES["gpt2"]
    assert {k: getattr(modern(), k) for k in SWITCHES} == RECIPES["modern"]
    assert {k: getattr(speedrun(), k) for k in SWITCHES} == RECIPES["speedrun"]
    assert RECIPES["speedrun"] == {**RECIPES["modern"], "embed_norm": True, "unet_skips": True}
    ablated = modern(qk_norm=False)
    assert ablated.qk_norm is False
    assert {k: getattr(ablated, k) for k in SWITCHES if k != "qk_norm"} == \
        {k: v for k, v in RECIPES["modern"].items() if k != "qk_norm"}
    assert ModelConfig(logit_softcap=30).logit_softcap == 30.0  # a switch set on the gpt2 recipe


@pytest.mark.parametrize("model", [{}, {"recipe": "modern"}, {"recipe": "modern", "qk_norm": False, "n_head": 4},
                                   {"positions": "rotary", "logit_softcap": 30, "bias": True}])
def test_yaml_round_trip_gives_an_equal_config(model):
    exp = config.from_dict({"model": model, "train": {"max_iters": 5}, "data": {"paths": ["x.parquet"]}})
    again = config.from_dict(yaml.safe_load(config.to_yaml(exp)))
    assert again == exp
    assert config.flatten(exp)["model.positions"] in ("learned", "rotary")  # the resolved value is what is logged


def test_overrides_on_the_command_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}\ntrain: {max_iters: 5}\n"
                    "data: {paths: [x.parquet]}\n")
    exp = config.load(path, ["model.recipe=modern", "model.qk_norm=false", "model.logit_softcap=0"])
    assert (exp.model.recipe, exp.model.qk_norm, exp.model.logit_softcap, exp.model.norm) == \
        ("modern", False, 0.0, "rmsnorm")


@pytest.mark.parametrize("changes, key", [
    ({"recipe": "llama"}, "model.recipe"),
    ({"positions": "alibi"}, "model.positions"),
    ({"norm": "batchnorm"}, "model.norm"),
    ({"mlp": "swiglu"}, "model.mlp"),
    ({"logit_softcap": -1.0}, "model.logit_softcap"),
    ({"logit_softcap": math.inf}, "model.logit_softcap"),
    ({"recipe": "modern", "bias": True}, "model.bias"),
    ({"recipe": "speedrun", "bias": True}, "model.bias"),
    ({"positions": "rotary", "n_embd": 30, "n_head": 2}, "model.n_embd"),  # head size 15: no channel pairs
    ({"zero_init_head": True}, "model.zero_init_head"),  # gpt2's head is tied
    ({"value_embeds": -1}, "model.value_embeds"),
    ({"value_embeds": 2}, "model.value_embeds"),  # 2 layers: one table feeds both
])
def test_bad_values_are_one_line_errors_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**TINY, **changes})
    assert str(info.value).startswith(f"{key} = ") and "\n" not in str(info.value)


def test_wrong_types_in_yaml_name_the_key():
    with pytest.raises(ConfigError, match="model.qk_norm"):
        config.from_dict({"model": {"qk_norm": "yes"}, "train": {"max_iters": 5}, "data": {"paths": ["x"]}})


# ---------------------------------------------------------------- parameters and FLOPs, every combination


def every_combination():
    """Every combination of the switches that shape the parameters (positions, norm, tying, bias), each with the
    other switches all at their first and all at their second value: 32 models (all 256 cost ~10 s on meta)."""
    shaping = dict(positions=("learned", "rotary"), norm=("layernorm", "rmsnorm"), tie_embeddings=(False, True),
                   bias=(False, True))
    others = dict(qk_norm=(False, True), mlp=("gelu", "relu2"), zero_init_proj=(False, True),
                  logit_softcap=(0.0, 15.0), zero_init_head=(False, True), embed_norm=(False, True),
                  value_embeds=(0, 1), unet_skips=(False, True))
    for combo in itertools.product(*shaping.values()):
        for pick in (0, 1):  # 8 channels keep the 50304-row embeddings cheap
            switches = {**dict(zip(shaping, combo)), **{k: v[pick] for k, v in others.items()}}
            switches["zero_init_head"] &= not switches["tie_embeddings"]  # a tied head is the input embedding
            yield ModelConfig(**{**TINY, "n_embd": 8}, **switches)


def expected_params(cfg: ModelConfig) -> int:
    """The count written down from the architecture, independently of the code that builds it."""
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    embeddings = V * C * (1 if cfg.tie_embeddings else 2) + (T * C if cfg.positions == "learned" else 0)
    # attention qkv + output, MLP up + down; biases on each Linear when bias is set
    block = 12 * C * C + (3 * C + C + 4 * C + C if cfg.bias else 0)
    # LayerNorm: a gain (and a bias with bias); RMSNorm and QK-norm: no parameters
    norm = (C * (2 if cfg.bias else 1)) if cfg.norm == "layernorm" else 0
    # value embeddings: a V x C table each and two mixing weights in each of the 2n layers that read one; U-net: a
    # weight per skip, L/2 of them
    value_embeds = cfg.value_embeds * (V * C + 2 * 2)
    return (embeddings + L * (block + 2 * norm) + norm + (norm if cfg.embed_norm else 0) + value_embeds
            + (L // 2 if cfg.unet_skips else 0))


def test_count_params_is_exact_for_every_combination():
    counts = set()
    for cfg in every_combination():
        counts.add(count_params(cfg))
        assert count_params(cfg) == expected_params(cfg), cfg
    # positions x norm x tie x bias change the count (16); so do the others' second values (value embeddings and
    # skips; embed_norm's gain under layernorm): 16 more
    assert len(counts) == 32
    cfg = next(every_combination())
    assert count_params(cfg) == sum(p.numel() for p in GPT(cfg).parameters())  # the meta count is the real one


def test_parameter_names_follow_the_switches():
    gpt2 = dict(GPT(ModelConfig(**TINY)).named_parameters())
    assert "transformer.wpe.weight" in gpt2 and "lm_head.weight" not in gpt2  # tied: listed once, as wte
    new = dict(GPT(modern()).named_parameters())
    assert "transformer.wpe.weight" not in new and "lm_head.weight" in new
    assert all(p.dim() == 2 for p in new.values())  # no biases, no norm gains: matrices only
    assert set(new) - {"lm_head.weight"} < set(gpt2)  # the same nanoGPT names otherwise


@pytest.mark.parametrize("cfg", [
    ModelConfig(**TINY),
    ModelConfig(**TINY, bias=True),
    modern(),
    modern(positions="learned", tie_embeddings=True, mlp="gelu", norm="layernorm"),
    ModelConfig(**TINY, recipe="modern", positions="learned", qk_norm=False, bias=False, logit_softcap=0),
    speedrun(),
    ModelConfig(**TINY, bias=True, embed_norm=True),
    skipping(),
    ModelConfig(**{**TINY, "n_layer": 5}, bias=True, value_embeds=2, unet_skips=True),
], ids=["gpt2", "gpt2-bias", "modern", "modern-learned-tied-gelu-ln", "modern-learned-noqk-nocap", "speedrun",
        "gpt2-bias-embed-norm", "speedrun-value-embeds-unet", "gpt2-bias-value-embeds-unet"])
def test_flops_per_token_equals_measured_forward_backward(cfg):
    """The formula against FlopCounterMode over a full training forward+backward of sequences of block_size tokens
    (math attention: the CPU's fused kernel has no FLOP formula registered)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = GPT(cfg, loss_chunk_size=10)
    x, y = batch(cfg)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x, y).backward()
    assert counter.get_total_flops() == flops_per_token(cfg, count_params(cfg)) * x.numel()


# ---------------------------------------------------------------- each piece against its plain definition


def test_rotary_is_a_complex_rotation_by_position():
    B, T, H, D = 2, 16, 3, 8
    x = torch.randn(B, T, H, D, dtype=torch.float64)
    got = apply_rotary(x, *(t.double() for t in Rotary(D, T)(T)))
    # channel pair j is the complex number x[j] + i x[j + D/2], multiplied by exp(i * theta_j * pos)
    z = torch.view_as_complex(torch.stack(x.chunk(2, dim=-1), dim=-1).contiguous())
    theta = 10_000 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta  # (T, D/2)
    rotated = z * torch.exp(1j * angle)[None, :, None, :]
    torch.testing.assert_close(got, torch.cat([rotated.real, rotated.imag], dim=-1), rtol=1e-6, atol=1e-6)
    # what it is for: q.k depends on the positions' difference only
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qs, ks = (apply_rotary(t.expand(1, T, 1, D), *(c.double() for c in Rotary(D, T)(T)))[0, :, 0] for t in (q, k))
    torch.testing.assert_close(qs[5] @ ks[2], qs[12] @ ks[9])


def test_rmsnorm_and_qk_norm_are_x_over_rms():
    model = GPT(modern())
    x = torch.randn(4, 5, 32)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    for norm in (model.transformer.h[0].ln_1, model.transformer.h[1].ln_2, model.transformer.ln_f):
        torch.testing.assert_close(norm(x), want)
    heads = x.view(4, 5, 2, 16)  # QK-norm: per head
    torch.testing.assert_close(model.transformer.h[0].attn.qk_norm(heads),
                               heads / torch.sqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert GPT(modern(qk_norm=False)).transformer.h[0].attn.qk_norm is None


@pytest.mark.parametrize("cfg", [speedrun(), ModelConfig(**TINY, embed_norm=True)], ids=["rmsnorm", "layernorm"])
def test_embed_norm_gives_the_first_block_normalised_embeddings(cfg):
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)  # embeddings grown far from unit RMS
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda block, args: seen.append(args[0]))
    x, _ = batch(cfg)
    model(x)
    rms = seen[0].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    assert "transformer.ln_e" not in dict(GPT(modern()).named_modules())  # off: no module, modern's names


def test_value_embeddings_mix_a_shared_table_into_the_values_of_the_first_and_last_layers():
    cfg = speedrun(n_layer=5, value_embeds=2)
    model = nonzero(cfg)
    tables = [getattr(b.attn, "ve_lambdas", None) is not None for b in model.transformer.h]
    assert tables == [True, True, False, True, True]  # table 0 feeds layers 0 and 3, table 1 layers 1 and 4
    assert {n for n, _ in model.named_parameters() if "value_embeds" in n} == {"value_embeds.0.weight",
                                                                               "value_embeds.1.weight"}
    x, y = batch(cfg)
    attn = model.transformer.h[3].attn
    seen = {}
    # the attention's arguments: (x, rotary, mask, ve)
    attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], ve=args[3], out=out))
    model(x, y)
    torch.testing.assert_close(seen["ve"], model.value_embeds[0](x))  # layer 3 reads table 0
    # the attention by hand: values = lambda_0 v + lambda_1 ve, everything else as without them
    B, T, C = seen["x"].shape
    q, k, v = (t.view(B, T, 2, C // 2) for t in attn.c_attn(seen["x"]).split(C, dim=2))
    v = 0.5 * v + 0.5 * seen["ve"].view_as(v)  # the weights' initial values
    rotary = model.rotary(T)
    q, k = (apply_rotary(attn.qk_norm(t), *rotary) for t in (q, k))
    y_ = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    torch.testing.assert_close(seen["out"], attn.c_proj(y_.transpose(1, 2).reshape(B, T, C)))
    # the tables learn: rows of the tokens read get gradients, the others none
    model(x, y).backward()
    read = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    read[x.flatten()] = True
    for table in model.value_embeds:
        assert table.weight.grad[read].abs().sum(-1).gt(0).all() and not table.weight.grad[~read].any()


def test_unet_skips_add_the_first_halfs_outputs_to_the_mirrored_blocks_inputs():
    cfg = speedrun(n_layer=5, unet_skips=True)
    model = nonzero(cfg)
    assert model.skip_weights.tolist() == [1.0, 1.0]  # one per skip, from 1 (modded-nanogpt's)
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.3, -2.0]))
    inputs, outputs = {}, {}
    for i, block in enumerate(model.transformer.h):
        block.register_forward_pre_hook(lambda mod, args, i=i: inputs.update({i: args[0]}))
        block.register_forward_hook(lambda mod, args, out, i=i: outputs.update({i: out}))
    x, _ = batch(cfg)
    model(x)
    torch.testing.assert_close(inputs[1], outputs[0])
    torch.testing.assert_close(inputs[2], outputs[1])  # the middle block: no skip
    torch.testing.assert_close(inputs[3], outputs[2] - 2.0 * outputs[1])
    torch.testing.assert_close(inputs[4], outputs[3] + 0.3 * outputs[0])


def test_switched_off_or_neutral_the_new_pieces_leave_todays_model():
    """Off: no parameter, nanoGPT's names. On with lambda (1, 0) and skip weights 0: exactly the model without them,
    on the weights they share (bit for bit)."""
    off = nonzero(speedrun(n_layer=3, unet_skips=False))
    names = {n for n, _ in off.named_parameters()}
    assert not any("value_embeds" in n or "ve_lambdas" in n or "skip_weights" in n for n in names)
    on = GPT(skipping(), loss_chunk_size=off.loss_chunk_size)  # the same summation of the loss
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"value_embeds.0.weight", "transformer.h.0.attn.ve_lambdas",
                                               "transformer.h.2.attn.ve_lambdas", "skip_weights"}
    with torch.no_grad():
        on.skip_weights.zero_()
        for block in (on.transformer.h[0], on.transformer.h[2]):
            block.attn.ve_lambdas.copy_(torch.tensor([1.0, 0.0]))
    x, y = batch(off.config)
    torch.testing.assert_close(on(x, y), off(x, y), rtol=0, atol=0)
    torch.testing.assert_close(on(x), off(x), rtol=0, atol=0)


def test_relu2_is_relu_squared():
    x = torch.randn(100)
    torch.testing.assert_close(GPT(modern()).transformer.h[0].mlp.act(x), F.relu(x) ** 2)


def test_soft_cap_bounds_the_logits_of_forward_and_generation():
    cfg = modern()
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # logits far beyond the cap
        x, _ = batch(cfg, 1)
        raw = model.lm_head(model.hidden(x)[:, -1])
        capped = model(x)
    assert raw.abs().max() > 10 * cfg.logit_softcap
    assert capped.abs().max() <= cfg.logit_softcap
    torch.testing.assert_close(capped, cfg.logit_softcap * torch.tanh(raw / cfg.logit_softcap))
    out = model.generate(x[:, :4], max_new_tokens=3, temperature=0)
    assert out.shape == (1, 7) and int(out.max()) < 50257


def test_untied_head_and_zero_init():
    model = GPT(modern())
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert model.transformer.wte.weight.std() > 0.01 and model.lm_head.weight.std() > 0.01
    assert GPT(modern(zero_init_proj=False)).transformer.h[0].mlp.c_proj.weight.any()
    # nanochat's zero head, one switch away: every logit 0, the first loss exactly ln(vocab)
    zero_head = GPT(modern(zero_init_head=True))
    assert not zero_head.lm_head.weight.any() and zero_head.transformer.wte.weight.std() > 0.01
    x, y = batch(zero_head.config)
    torch.testing.assert_close(zero_head(x, y), torch.tensor(math.log(50304)))


# ---------------------------------------------------------------- the modern model through the machinery


def grads_of(model, x, y, run=None):
    loss = (model if run is None else run)(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def nonzero(cfg):
    """A model of `cfg` with no zero weight, as after some training: with zero-init projections, most of the first
    steps' gradients are zero or tiny, and comparisons of them would pass trivially or drown in rounding."""
    torch.manual_seed(0)
    model = GPT(cfg, loss_chunk_size=12)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model


@pytest.mark.parametrize("recipe", [modern, speedrun, skipping])
def test_activation_checkpointing_changes_nothing(recipe):
    cfg = recipe()
    model = nonzero(cfg)
    x, y = batch(cfg)
    plain = grads_of(model, x, y)
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = True
    checkpointed = grads_of(model, x, y)
    torch.testing.assert_close(plain, checkpointed, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", [modern, speedrun, skipping])
def test_bf16_autocast_runs_close_to_fp32(recipe):
    cfg = recipe()
    model = nonzero(cfg)
    x, y = batch(cfg)
    loss32, grads32 = grads_of(model, x, y)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = grads_of(model, x, y)
    assert abs(loss16.item() - loss32.item()) < 0.05
    for name, g in grads16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert F.cosine_similarity(g.flatten(), grads32[name].flatten(), dim=0) > 0.95, name


@pytest.mark.parametrize("recipe", [modern, speedrun, skipping])
def test_compile_matches_eager(recipe):
    cfg = recipe()
    model = nonzero(cfg)
    x, y = batch(cfg)
    eager = grads_of(model, x, y)
    model.zero_grad(set_to_none=True)
    compiled = grads_of(model, x, y, run=torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", [modern, speedrun, skipping])
def test_memory_estimate_runs_and_matches_a_real_cpu_run(recipe):
    cfg = dataclasses.replace(recipe(), block_size=32)
    train = TrainConfig(batch_size=2, gradient_accumulation_steps=8, max_iters=10, compile=False, loss_chunk_size=64,
                        **config.RECIPE_TRAINING[cfg.recipe].get("train", {}))
    fake = memory.measure_peak_bytes(cfg, train, 4, dtype=torch.float32, fake=True)
    real = memory.measure_peak_bytes(cfg, train, 4, dtype=torch.float32, fake=False)
    assert fake["peak"] == pytest.approx(real["peak"], rel=0.05)
    if train.optimizer == "adamw":
        assert real["params"] == pytest.approx(4 * count_params(cfg), rel=0.01)  # weights, grads, two AdamW moments
    estimate = memory.estimate_peak_bytes(cfg, train, 4, activation_checkpointing=True)
    assert estimate["dtype"] == "bfloat16" and estimate["reserved"] > estimate["peak"] > fake["params"] / 2


@pytest.mark.parametrize("cfg", [modern(qk_norm=False), skipping()], ids=["modern", "value-embeds-unet"])
def test_a_saved_modern_model_loads_back(tmp_path, cfg):  # a resolved ablation survives the round trip too
    exp = config.Experiment(model=cfg)
    model = nonzero(cfg).eval()
    checkpoint.save_model(tmp_path, exp, model.state_dict(), step=7, val_loss=3.0)
    loaded, meta = checkpoint.load_model(tmp_path)
    assert loaded.config == cfg and meta["step"] == 7
    assert dataclasses.asdict(loaded.config) == {k: meta[k] for k in dataclasses.asdict(cfg)}
    x, _ = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_model_saved_before_the_value_embeddings_and_skips_existed_loads_as_it_was(tmp_path):
    """Its model_config.json lacks the two keys: they resolve to what every model had then (off), not to the recipe's
    default now (speedrun: skips on)."""
    cfg = speedrun(unet_skips=False)
    model = nonzero(cfg).eval()
    checkpoint.save_model(tmp_path, config.Experiment(model=cfg), model.state_dict(), step=3, val_loss=3.0)
    path = tmp_path / checkpoint.MODEL_CONFIG
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("value_embeds", "unet_skips")}))
    loaded, _ = checkpoint.load_model(tmp_path)
    assert speedrun().unet_skips and loaded.config == cfg
    x, _ = batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_resuming_a_state_of_another_model_is_one_line_naming_the_setting():
    from fwray.core.engine import Engine
    from fwray.errors import FwrayError

    t = TrainConfig(optimizer="muon", compile=False)
    old = Engine.build(speedrun(unet_skips=False), t, torch.device("cpu")).state(0, {})
    with pytest.raises(FwrayError) as info:
        Engine.build(speedrun(), t, torch.device("cpu")).load(old)
    assert "skip_weights" in str(info.value) and "model.unet_skips=false" in str(info.value)
    assert "\n" not in str(info.value)
