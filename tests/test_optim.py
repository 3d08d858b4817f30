"""fwray.core.optim: parameter groups (each parameter in exactly one, for the tied GPT-2 recipe and an untied model without
position embeddings), the rates' defaults, checkpoints that do not fit, the train section's new keys, and the memory
estimate under Muon. The schedules and the engine with Muon (skipped steps, accumulation, resume) are in
test_engine.py."""
import dataclasses

import pytest
import torch

from fwray.config import ConfigError, ModelConfig, TrainConfig
from fwray.core import memory
from fwray.core.engine import Engine
from fwray.core.model import GPT
from fwray.core.optim import (EMBEDDING_LR, HEAD_LR, MUON_ADJUST_LR, MUON_LR, MUON_MOMENTUM_START, make_optimizer,
                              muon_momentum, param_groups)
from fwray.errors import FwrayError

CPU = torch.device("cpu")


def gpt2(n_embd=32, bias=False) -> GPT:
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=32, bias=bias))


def untied_without_wpe() -> GPT:
    """The modern recipe's shape as far as the groups care: an lm_head of its own, no position embeddings."""
    model = gpt2(bias=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    del model.transformer["wpe"]
    return model


def by_name(model, groups) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


@pytest.mark.parametrize("build", [gpt2, lambda: gpt2(bias=True), untied_without_wpe])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_parameter_in_exactly_one_group(build, optimizer):
    model = build()
    t = TrainConfig(optimizer=optimizer)
    groups = param_groups(model, t)
    held = [p for g in groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))  # parameters() counts once
    named = by_name(model, groups)
    tied = model.lm_head.weight is getattr(model.transformer, "wte").weight
    assert named["head"] == ({"transformer.wte.weight"} if tied else {"lm_head.weight"})
    assert named.get("embedding", set()) == {n for n in ("transformer.wpe.weight", "transformer.wte.weight")
                                             if n in dict(model.named_parameters()) and n not in named["head"]}
    assert named["matrices"] == {n for n, p in model.named_parameters() if n.startswith("transformer.h.")
                                 and p.ndim == 2}
    assert named["scalars"] == {n for n, p in model.named_parameters() if p.ndim < 2}
    # and the optimizers hold the same parameters once each: Muon the matrices, AdamW the rest
    opt = make_optimizer(model, t)
    in_optimizers = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizers} == {id(p) for p in held} and len(in_optimizers) == len(held)
    assert sorted(opt.optimizers) == (["adamw", "muon"] if optimizer == "muon" else ["adamw"])
    if optimizer == "muon":
        assert [g["name"] for g in opt.optimizers["muon"].param_groups] == ["matrices"]


def test_value_embeddings_and_skip_weights_go_to_adamw():
    """The value embedding tables are embeddings (AdamW at the embedding's rate, decayed), their mixing weights and the
    U-net's skip weights scalars (AdamW, no decay): Muon keeps the blocks' matrices only."""
    model = GPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, recipe="speedrun", value_embeds=1,
                            unet_skips=True))
    t = TrainConfig(optimizer="muon", weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, t)}
    named = by_name(model, groups.values())
    assert named["embedding"] == {"transformer.wte.weight", "value_embeds.0.weight"}
    assert named["scalars"] == {"skip_weights", "transformer.h.0.attn.ve_lambdas", "transformer.h.2.attn.ve_lambdas"}
    assert groups["embedding"]["lr"] == EMBEDDING_LR * (32 / 768) ** -0.5 and groups["embedding"]["weight_decay"] == 0.1
    assert groups["scalars"]["lr"] == t.learning_rate and groups["scalars"]["weight_decay"] == 0.0
    muon = make_optimizer(model, t).optimizers["muon"]
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert in_muon == {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2}


def test_adamw_rates_and_decay_are_nanogpts():
    groups = {g["name"]: g for g in param_groups(gpt2(bias=True), TrainConfig(learning_rate=1e-3, weight_decay=0.1))}
    assert {n: g["lr"] for n, g in groups.items()} == dict.fromkeys(groups, 1e-3)  # one rate for all
    assert {n: g["weight_decay"] for n, g in groups.items()} == {"scalars": 0.0, "head": 0.1, "embedding": 0.1,
                                                                 "matrices": 0.1}
    given = param_groups(gpt2(), TrainConfig(learning_rate=1e-3, head_lr=2e-3, embedding_lr=3e-3))
    assert {g["name"]: g["lr"] for g in given} == {"scalars": 1e-3, "head": 2e-3, "embedding": 3e-3, "matrices": 1e-3}


def test_muon_defaults_scale_with_width():
    def rates(n_embd, **train):
        with torch.device("meta"):  # shapes only
            model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=n_embd, block_size=16))
        return {g["name"]: g["lr"] for g in param_groups(model, TrainConfig(optimizer="muon", **train))}

    at_768 = rates(768)
    assert at_768 == {"scalars": 6e-4, "head": HEAD_LR, "embedding": EMBEDDING_LR, "matrices": MUON_LR}
    wider = rates(3072)  # 4x the width: AdamW's embedding and head rates halve, Muon's (shape-scaled) stays
    assert wider["head"] == pytest.approx(HEAD_LR / 2) and wider["embedding"] == pytest.approx(EMBEDDING_LR / 2)
    assert wider["matrices"] == MUON_LR and wider["scalars"] == 6e-4
    assert rates(768, muon_lr=0.05, head_lr=1e-3, embedding_lr=0.1) == {
        "scalars": 6e-4, "head": 1e-3, "embedding": 0.1, "matrices": 0.05}


def test_muon_settings():
    t = TrainConfig(optimizer="muon", muon_momentum=0.9, weight_decay=0.05)
    muon = make_optimizer(gpt2(), t).optimizers["muon"]
    assert isinstance(muon, torch.optim.Muon)
    (group,) = muon.param_groups
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.05 and group["adjust_lr_fn"] == "original"


def test_muon_weight_decay_has_its_own_key():
    def decays(**train):
        return {g["name"]: g["weight_decay"] for g in param_groups(gpt2(bias=True), TrainConfig(**train))}

    assert decays(optimizer="muon", weight_decay=0.1) == {"scalars": 0.0, "head": 0.1, "embedding": 0.1,
                                                          "matrices": 0.1}  # unset: weight_decay, as before
    assert decays(optimizer="muon", weight_decay=0.1, muon_weight_decay=0.0) == {
        "scalars": 0.0, "head": 0.1, "embedding": 0.1, "matrices": 0.0}
    assert decays(weight_decay=0.1, muon_weight_decay=0.0)["matrices"] == 0.1  # adamw: no Muon, no Muon key


def one_muon_step(model: GPT, train: TrainConfig, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    opt = make_optimizer(model, train)
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    opt.step(1.0, found_inf=torch.zeros(()))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_muon_update(after: torch.Tensor, reference: torch.Tensor, before: torch.Tensor) -> None:
    """fwray's Muon step against torch's on the same matrix: the same update to float32 rounding (fwray's skip factor
    and batched Newton-Schulz round in another order; one bfloat16 ulp, 2^-7, would be a different step)."""
    ours, theirs = after - before, reference - before
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


def test_split_qkv_orthogonalises_query_key_and_value_one_by_one():
    torch.manual_seed(0)
    start = gpt2().state_dict()
    grads = {n: torch.randn_like(p) for n, p in gpt2().named_parameters()}
    t = TrainConfig(optimizer="muon", weight_decay=0.1)

    def fresh():
        model = gpt2()
        model.load_state_dict(start)
        return model

    fused = one_muon_step(fresh(), t, grads)
    split = one_muon_step(fresh(), dataclasses.replace(t, muon_split_qkv=True), grads)
    for i in range(2):
        name = f"transformer.h.{i}.attn.c_attn.weight"
        # torch's own Muon on the query, key and value matrices as three parameters of their own
        parts = [torch.nn.Parameter(w.clone()) for w in start[name].chunk(3)]
        for p, g in zip(parts, grads[name].chunk(3)):
            p.grad = g.clone()
        torch.optim.Muon(parts, lr=MUON_LR, weight_decay=0.1, adjust_lr_fn=MUON_ADJUST_LR).step()
        assert_same_muon_update(split[name], torch.cat([p.detach() for p in parts]), start[name])
        assert not torch.allclose(split[name], fused[name])  # one 3C x C matrix is another update
        # the fused run is torch's Muon on the fused matrix
        whole = torch.nn.Parameter(start[name].clone())
        whole.grad = grads[name].clone()
        torch.optim.Muon([whole], lr=MUON_LR, weight_decay=0.1, adjust_lr_fn=MUON_ADJUST_LR).step()
        assert_same_muon_update(fused[name], whole.detach(), start[name])
    other = "transformer.h.0.mlp.c_fc.weight"  # every other matrix: one matrix, either way
    torch.testing.assert_close(split[other], fused[other], rtol=0, atol=0)


def test_muon_takes_torchs_steps_batched_and_skips_on_the_device():
    """Four steps of fwray's Muon (matrices stacked by shape, the skip flag a device tensor) against torch.optim.Muon
    on the same gradients, momentum carried from step to step; the third step's flag is 1: fwray leaves weights and
    momentum as they were, and torch's run simply does not take that step."""
    torch.manual_seed(0)
    model = gpt2()
    ours = make_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.1)).optimizers["muon"]
    matrices = ours.param_groups[0]["params"]
    theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
    theirs = torch.optim.Muon(theirs_params, lr=MUON_LR, weight_decay=0.1, adjust_lr_fn=MUON_ADJUST_LR)
    assert len({p.shape for p in matrices}) > 1  # several shape groups
    for step in range(4):
        skipped = step == 2
        grads = [torch.randn_like(p) * (float("nan") if skipped else 1.0) for p in matrices]
        before = [p.detach().clone() for p in matrices]
        momentum = [ours.state[p]["momentum_buffer"].clone() for p in matrices if p in ours.state]
        for p, g in zip(matrices, grads):
            p.grad = g
        ours.found_inf = torch.tensor(float(skipped))
        ours.step()
        if skipped:
            assert all(torch.equal(p, b) for p, b in zip(matrices, before))
            assert all(torch.equal(ours.state[p]["momentum_buffer"], m) for p, m in zip(matrices, momentum))
            continue
        for p, g in zip(theirs_params, grads):
            p.grad = g.clone()
        theirs.step()
        for p, b, q in zip(matrices, before, theirs_params):
            assert_same_muon_update(p.detach(), q.detach(), b)


def test_muon_momentum_warms_up_with_the_step_only():
    t = TrainConfig(optimizer="muon", muon_momentum=0.95, muon_momentum_warmup=300)
    assert muon_momentum(0, t) == MUON_MOMENTUM_START == 0.85
    assert muon_momentum(150, t) == pytest.approx(0.90)
    assert muon_momentum(300, t) == muon_momentum(5000, t) == 0.95
    rising = [muon_momentum(s, t) for s in range(302)]
    assert rising == sorted(rising)
    assert muon_momentum(0, TrainConfig(optimizer="muon")) == 0.95  # no warmup: the configured momentum throughout
    opt = make_optimizer(gpt2(), t)
    for p in opt.optimizers["muon"].param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step(1.0, found_inf=torch.zeros(()), muon_momentum=muon_momentum(30, t))
    assert opt.optimizers["muon"].param_groups[0]["momentum"] == pytest.approx(0.86)


def test_a_checkpoint_from_the_other_optimizer_is_refused():
    t = TrainConfig(batch_size=2, max_iters=2, compile=False)
    state = Engine.build(gpt2().config, t, CPU).state(0, {})
    engine = Engine.build(gpt2().config, dataclasses.replace(t, optimizer="muon"), CPU)
    with pytest.raises(FwrayError, match=r"optimizer state has parts \['adamw'\], this run's optimizers are "
                                         r"\['adamw', 'muon'\]"):
        engine.load(state)


@pytest.mark.parametrize("key, value, why", [
    ("optimizer", "sgd", "must be adamw or muon"),
    ("schedule", "linear", "must be cosine or wsd"),
    ("decay_fraction", 0.0, r"must be in \(0, 1\]"),
    ("decay_fraction", 1.5, r"must be in \(0, 1\]"),
    ("muon_lr", 0.0, "must be positive"),
    ("head_lr", -1e-3, "must be positive"),
    ("embedding_lr", 0.0, "must be positive"),
    ("muon_momentum", 1.0, r"must be in \[0, 1\)"),
    ("weight_decay", -0.1, "must be 0"),
    ("muon_weight_decay", -0.1, "must be 0"),
    ("muon_momentum_warmup", -1, "must be at least 0"),
])
def test_train_section_checks_the_new_keys(key, value, why):
    with pytest.raises(ConfigError, match=f"train.{key} = .*: {why}"):
        TrainConfig(**{key: value})


def test_memory_estimate_under_muon():
    model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
    peaks = {}
    for optimizer in ("adamw", "muon"):
        t = TrainConfig(batch_size=2, gradient_accumulation_steps=8, max_iters=10, compile=False, loss_chunk_size=64,
                        optimizer=optimizer)
        fake = memory.measure_peak_bytes(model, t, 4, dtype=torch.float32, fake=True)
        real = memory.measure_peak_bytes(model, t, 4, dtype=torch.float32, fake=False)
        assert fake == real  # FakeTensorMode changes nothing, Muon's step included
        peaks[optimizer] = real["train_peak"]
    # Muon keeps one buffer per hidden matrix where AdamW keeps two (and a step count): the peak is that much lower
    matrices = 2 * 12 * 32 * 32 * 4
    assert peaks["adamw"] - peaks["muon"] == pytest.approx(matrices, rel=0.05)
