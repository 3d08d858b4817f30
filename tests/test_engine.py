"""The pure-torch engine on CPU: loss falls on real tokens, accumulation scaling, non-finite steps, lr schedules,
deterministic batches, and resume that reproduces an uninterrupted run; what depends on the optimizer, under adamw
and muon."""
import copy
import dataclasses
import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from fwray.config import ModelConfig, TrainConfig
from fwray.core.engine import Engine, NonFiniteLoss, train
from fwray.core.loader import Batches
from fwray.core.model import GPT
from fwray.core.optim import EMBEDDING_LR, HEAD_LR, MUON_LR, lr_multiplier
from fwray.core.tokens import EOT, encode_documents, get_tokenizer
from steps import assert_same_grads, assert_same_update, fixed_batch, look_at_step, optimizer_of, update_mismatch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def token_files(corpus, tmp_path_factory):
    """Part of the shared corpus tokenized into a train and a val .bin (the shard format: uint16, EOT first)."""
    folder = tmp_path_factory.mktemp("tokens")
    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()[:160]
    enc = get_tokenizer("gpt2")
    files = {}
    for split, docs in (("train", texts[:140]), ("val", texts[140:])):
        ids, _ = encode_documents(enc, docs)
        files[split] = folder / f"{split}.bin"
        ids.tofile(files[split])
    return files


MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


def train_section(**changes) -> TrainConfig:
    """The engine needs the model and train sections only (resolved: the decay length fixed, as config.resolve
    does, so a run cut short keeps the schedule of the whole run)."""
    t = dict(batch_size=8, max_iters=40, learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=10,
             eval_iters=4, log_interval=5, compile=False, seed=1337)
    t.update(changes)
    t.setdefault("lr_decay_iters", t["max_iters"])
    return TrainConfig(**t)


def batches_for(t, token_files, **kw):
    return Batches.from_files([token_files["train"]], [token_files["val"]], MODEL.block_size,
                              batch_size=t.batch_size, seed=t.seed, **kw)


class Recorder:
    def __init__(self):
        self.metrics, self.states = {}, {}

    def __call__(self, step, metrics, state):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, v))
        if state is not None:
            buf = io.BytesIO()  # what a checkpoint goes through: torch.save, then a weights_only load
            torch.save(state, buf)
            buf.seek(0)
            self.states[step] = torch.load(buf, weights_only=True)


def test_loss_falls_on_real_tokens(token_files):
    t = train_section(max_iters=24, eval_interval=8, log_interval=4, learning_rate=6e-3, warmup_iters=3)
    rec = Recorder()
    summary = train(MODEL, t, batches_for(t, token_files), rec, device=CPU)
    val = [v for _, v in rec.metrics["val_loss"]]
    assert [s for s, _ in rec.metrics["val_loss"]] == [0, 8, 16, 24]
    assert val[0] == pytest.approx(math.log(50304), abs=0.3)  # an untrained model is about uniform
    assert val[0] - val[-1] >= 1.0, val
    assert summary["first_val_loss"] == val[0] and summary["final_val_loss"] == val[-1]
    assert [s for s, _ in rec.metrics["train_loss"]] == [4, 8, 12, 16, 20, 24]
    assert all(math.isfinite(v) and v > 0 for _, v in rec.metrics["tokens_per_s"])
    assert rec.metrics["tokens_seen"][-1] == (24, 24 * 8 * 32)
    assert sorted(rec.states) == [8, 16, 24]  # a checkpoint at every evaluation after the start


# the speedrun recipe's pieces: Muon's momentum still warming up at the resume, Q/K/V split, the embedding's norm
SPEEDRUN = (ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, recipe="speedrun"),
            dict(optimizer="muon", muon_split_qkv=True, muon_momentum_warmup=6, schedule="wsd", decay_fraction=0.5))


# and its value embeddings and U-net skips (the table is read by both layers, the second takes the first's output)
SKIPPING = (dataclasses.replace(SPEEDRUN[0], n_layer=2, value_embeds=1, unet_skips=True), SPEEDRUN[1])


@pytest.mark.parametrize("model, changes", [(MODEL, dict(optimizer="adamw")), (MODEL, dict(optimizer="muon")),
                                            SPEEDRUN, SKIPPING], ids=["adamw", "muon", "speedrun", "skipping"])
def test_resume_reproduces_uninterrupted_run(token_files, model, changes):
    t = train_section(max_iters=8, eval_interval=4, eval_iters=2, log_interval=2, warmup_iters=2, **changes)
    full = Recorder()
    train(model, t, batches_for(t, token_files), full, device=CPU)
    first = Recorder()
    train(model, dataclasses.replace(t, max_iters=4), batches_for(t, token_files), first, device=CPU)
    # resume from step 4's checkpoint in a fresh loader (no loader state) with the full budget
    resumed = Recorder()
    summary = train(model, t, batches_for(t, token_files), resumed, device=CPU,
                    resume=first.states[4])
    assert summary["resumed_from"] == 4
    # exact, on any CPU: both runs are this process, with the same kernels on the same shapes in the same order
    # (Muon's bfloat16 included); only a different summation (accumulation, workers) needs a tolerance
    assert resumed.metrics["val_loss"][-1] == full.metrics["val_loss"][-1]
    for k, v in full.states[8]["model"].items():
        torch.testing.assert_close(resumed.states[8]["model"][k], v, rtol=0, atol=0)
    assert_identical(resumed.states[8]["optimizer"], full.states[8]["optimizer"])


def assert_identical(a, b, where="state"):
    """Two states (nested dicts and lists of tensors and plain values) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_accumulation_scaling_matches_one_big_batch(optimizer):
    """Accumulating 2 micro-batches of 4 is one batch of 8: the same loss and gradients (to float32 rounding) and the
    same update (to the optimizer's own rounding: tests/steps.py)."""
    x, y = fixed_batch()
    big = Engine.build(MODEL, train_section(batch_size=8, gradient_accumulation_steps=1, grad_clip=0.0,
                                            optimizer=optimizer), CPU)
    acc = Engine.build(MODEL, train_section(batch_size=4, gradient_accumulation_steps=2, grad_clip=0.0,
                                            optimizer=optimizer), CPU)
    halves = lambda micro: (x[4 * micro: 4 * micro + 4], y[4 * micro: 4 * micro + 4])  # noqa: E731
    loss_big, _, g_big, u_big = look_at_step(big, lambda micro: (x, y))
    loss_acc, _, g_acc, u_acc = look_at_step(acc, halves)

    # the reference: the plain mean cross-entropy over all 8 sequences, on the same initial weights
    torch.manual_seed(1337)
    ref = GPT(big.raw_model.config)
    logits = ref.lm_head(ref.hidden(x))
    ref_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    ref_loss.backward()

    torch.testing.assert_close(loss_big, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_acc, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    reference = {name: p.grad for name, p in ref.named_parameters()}
    assert_same_grads(g_big, reference)
    assert_same_grads(g_acc, reference)
    owners = optimizer_of(big)
    assert_same_update(u_acc, u_big, owners)

    # the bound can fail: accumulation that reads its first micro-batch twice moves the weights elsewhere
    wrong = Engine.build(MODEL, acc.train, CPU)
    _, _, _, u_wrong = look_at_step(wrong, lambda micro: halves(0))
    mismatch = update_mismatch(u_wrong, u_big, owners)
    assert min(mismatch.values()) > 1, mismatch


class Poison:
    """A forward hook on the final LayerNorm that turns the loss non-finite while `on` is true."""

    def __init__(self, engine):
        self.on = False
        engine.raw_model.transformer.ln_f.register_forward_hook(
            lambda mod, args, out: out * float("nan") if self.on else out)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nonfinite_step_is_skipped(optimizer):
    engine = Engine.build(MODEL, train_section(optimizer=optimizer), CPU)
    poison = Poison(engine)
    x, y = fixed_batch()
    engine.step(0, lambda m: (x, y))  # one good step: moments (and Muon's momentum) exist
    before = {k: v.clone() for k, v in engine.raw_model.state_dict().items()}
    state = copy.deepcopy({name: o.state_dict()["state"] for name, o in engine.optimizer.optimizers.items()})
    poison.on = True
    loss, bad = engine.step(1, lambda m: (x, y))
    assert bool(bad) and not torch.isfinite(loss)
    for k, v in engine.raw_model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a non-finite step"
    # moments, momentum buffers, step counts (the groups' rates follow the step: the schedule's, not state)
    assert_identical({name: o.state_dict()["state"] for name, o in engine.optimizer.optimizers.items()}, state)
    poison.on = False
    loss, bad = engine.step(2, lambda m: (x, y))
    assert not bool(bad) and torch.isfinite(loss)
    for k in ("lm_head.weight", "transformer.h.0.mlp.c_fc.weight"):  # an AdamW and (under muon) a Muon parameter
        assert not torch.equal(engine.raw_model.state_dict()[k], before[k])


class PoisonedBatches(Batches):
    """Real batches; the steps in `bad_steps` run with the poison on."""

    def __init__(self, base, poison, bad_steps):
        super().__init__(base.train, base.val, base.batch_size, base.seed)
        self.poison, self.bad_steps = poison, set(bad_steps)

    def train_batch(self, step, micro_step):
        self.poison.on = step in self.bad_steps
        return super().train_batch(step, micro_step)

    def val_batch(self, i):
        self.poison.on = False
        return super().val_batch(i)


def test_nonfinite_steps_counted_and_run_goes_on(token_files):
    t = train_section(max_iters=10, log_interval=5, eval_interval=10, max_nonfinite_steps=3)
    engine = Engine.build(MODEL, t, CPU)
    rec = Recorder()
    batches = PoisonedBatches(batches_for(t, token_files), Poison(engine), bad_steps={2, 3, 7})
    summary = train(MODEL, t, batches, rec, device=CPU, engine=engine)
    assert rec.metrics["nonfinite_skipped"] == [(5, 2), (10, 3)]
    assert summary["nonfinite_skipped"] == 3
    assert all(math.isfinite(v) for _, v in rec.metrics["train_loss"])  # the mean leaves skipped steps out
    assert rec.states[10]["counters"]["nonfinite_skipped"] == 3


def test_nonfinite_streak_stops_the_run(token_files):
    t = train_section(max_iters=20, log_interval=2, eval_interval=10, max_nonfinite_steps=3)
    engine = Engine.build(MODEL, t, CPU)
    rec = Recorder()
    batches = PoisonedBatches(batches_for(t, token_files), Poison(engine), bad_steps={3, 4, 5})
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        train(MODEL, t, batches, rec, device=CPU, engine=engine)
    assert rec.metrics["train_loss"][-1][0] == 4  # stopped at the first log after the third bad step (step 6)


def test_lr_schedule():
    t = train_section(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)

    def lr_at(step, train=t):
        return train.learning_rate * lr_multiplier(step, train)

    assert lr_at(0) == pytest.approx(1e-3 / 11)
    assert lr_at(4) == pytest.approx(1e-3 * 5 / 11)
    warm = [lr_at(s) for s in range(11)]
    assert warm == sorted(warm) and lr_at(10) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(60) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway through the cosine
    decay = [lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(110) == pytest.approx(1e-4) and lr_at(500) == pytest.approx(1e-4)
    longer = train_section(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_decay_iters=60)
    assert lr_at(60, longer) == pytest.approx(1e-4) and lr_at(80, longer) == pytest.approx(1e-4)


def test_wsd_schedule():
    t = train_section(schedule="wsd", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110,
                      decay_fraction=0.2)
    m = [lr_multiplier(s, t) for s in range(121)]
    assert m[0] == pytest.approx(1 / 11) and m[10] == 1.0  # the same warmup as cosine
    assert m[10:89] == [1.0] * 79  # constant up to the decay's start, (1 - 0.2) x 110 = 88
    assert m[99] == pytest.approx(1 - 0.5 * (1 - 0.1))  # linear: halfway down at 99
    assert all(a > b for a, b in zip(m[88:111], m[89:111]))
    assert m[110] == pytest.approx(0.1) and m[120] == pytest.approx(0.1)  # min_lr / learning_rate, then held
    # a pure function of the step: any order, any number of calls
    assert [lr_multiplier(s, t) for s in reversed(range(121))] == m[::-1]


def test_every_group_follows_the_schedule_from_its_own_rate():
    t = train_section(optimizer="muon", learning_rate=1e-3, min_lr=1e-4, warmup_iters=0, max_iters=10,
                      schedule="wsd", decay_fraction=0.5)
    engine = Engine.build(MODEL, t, CPU)
    width = (MODEL.n_embd / 768) ** -0.5
    base = {"scalars": 1e-3, "head": HEAD_LR * width, "embedding": EMBEDDING_LR * width, "matrices": MUON_LR}
    x, y = fixed_batch()
    for step in range(8):
        engine.step(step, lambda m: (x, y))
        rates = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
        assert rates == pytest.approx({name: lr * lr_multiplier(step, t) for name, lr in base.items()})
    assert lr_multiplier(7, t) == pytest.approx(1 - 2 / 5 * 0.9)  # inside the decay: the rates moved down


def test_batches_are_deterministic(token_files):
    t = train_section()
    a, b = batches_for(t, token_files), batches_for(t, token_files)
    for step, micro in [(0, 0), (7, 0), (7, 1), (1000, 3)]:
        xa, ya = a.train_batch(step, micro)
        xb, yb = b.train_batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
        assert xa.shape == (8, 32) and xa.dtype == torch.int64
    assert not torch.equal(a.train_batch(0, 0)[0], a.train_batch(1, 0)[0])
    assert not torch.equal(a.train_batch(0, 0)[0], a.train_batch(0, 1)[0])
    other = Batches(a.train, a.val, 8, seed=t.seed + 1)
    assert not torch.equal(a.train_batch(0, 0)[0], other.train_batch(0, 0)[0])
    assert torch.equal(a.val_batch(2)[0], b.val_batch(2)[0])
    # every window is real data from the file
    data = np.fromfile(token_files["train"], dtype=np.uint16)
    x, _ = a.train_batch(3, 0)
    row = x[0].numpy()
    hits = np.flatnonzero(data[: len(data) - 32] == row[0])
    assert any(np.array_equal(data[h:h + 32], row) for h in hits)


def test_resume_from_a_state_dict_marked_assign(token_files):
    """A checkpoint's model state that went through `load_state_dict(..., assign=True)` elsewhere (the sampler
    borrows the training weights that way) carries "assign" in its _metadata; resuming from it must still copy into
    the engine's tied parameters, or the optimizer would step parameters the model no longer uses."""
    t = train_section(max_iters=4, eval_interval=4, eval_iters=1, log_interval=2, warmup_iters=1)
    rec = Recorder()
    train(MODEL, t, batches_for(t, token_files), rec, device=CPU)
    state = rec.states[4]
    cfg = Engine.build(MODEL, t, CPU).raw_model.config
    with torch.device("meta"):
        borrower = GPT(cfg)
    borrower.load_state_dict(state["model"], assign=True)  # marks state["model"]._metadata
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    engine = Engine.build(MODEL, t, CPU)
    engine.load(state)
    model = engine.raw_model
    assert model.lm_head.weight is model.transformer.wte.weight
    optimized = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimized for p in model.parameters())
    before = model.lm_head.weight.detach().clone()
    x, y = fixed_batch()
    engine.step(4, lambda m: (x, y))
    assert not torch.equal(model.lm_head.weight, before)


def test_the_epoch_is_the_loaders_windows_read_over_its_layout(tmp_path):
    """One definition of an epoch, the sampler's. With documents aligned, a document of 40 tokens takes two windows
    of 32, so an epoch holds ~1.6x more windows than tokens / block_size: tokens read / tokens held (the figure the
    engine once logged) would say the run read 1.6x more epochs than it did."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[EOT], rng.integers(0, EOT, 39)]).astype(np.uint16) for _ in range(200)]
    for split in ("train", "val"):
        np.concatenate(docs).tofile(tmp_path / f"{split}.bin")
    files = {split: tmp_path / f"{split}.bin" for split in ("train", "val")}
    t = train_section(max_iters=4, eval_interval=4, log_interval=2, eval_iters=1, gradient_accumulation_steps=2)
    batches = batches_for(t, files, sampling="epoch", align_to_documents=True, accumulation=2)
    rec = Recorder()
    train(MODEL, t, batches, rec, device=CPU)
    windows_per_step = t.batch_size * t.gradient_accumulation_steps
    n = len(batches.layout)  # two windows a document, but the last one's second runs past the file's end
    assert n == 399 and n > 1.5 * 8000 / MODEL.block_size
    assert rec.metrics["epoch"] == [(2, 2 * windows_per_step / n), (4, 4 * windows_per_step / n)]
    random = batches_for(t, files)  # windows at any offset: tokens read / tokens held
    assert random.epochs_read(10) == 10 * MODEL.block_size / 8000


# Run in a fresh process whose C++ compiler does not exist: Inductor's CPU backend fails for real, as Triton does on
# a desktop without gcc. Auto leaves CPU uncompiled without the trial; asked-for compile tries, says why not, trains.
COMPILE_WITHOUT_A_COMPILER = """
import json, warnings, torch
from fwray.core import hardware
from fwray.config import ModelConfig, TrainConfig
from fwray.core.engine import Engine, compile_enabled
cpu = torch.device("cpu")
auto = compile_enabled(TrainConfig(compile="auto"), cpu)
trials_for_auto = hardware._trial_compile.cache_info().misses
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine = Engine.build(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16),
                          TrainConfig(batch_size=2, max_iters=2, compile=True), cpu)
x = torch.randint(0, 50257, (2, 17))
losses = [engine.step(s, lambda micro: (x[:, :-1], x[:, 1:]))[0].item() for s in range(2)]
print(json.dumps({"auto": auto, "trials_for_auto": trials_for_auto, "compiled": engine.compiled,
                  "warnings": [str(w.message) for w in caught if "uncompiled" in str(w.message)], "losses": losses}))
"""


def test_compile_falls_back_when_the_compiler_is_missing(tmp_path):
    import json
    import os
    import subprocess
    import sys

    # a cache of its own: no kernel compiled earlier on this machine stands in for the missing compiler
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", COMPILE_WITHOUT_A_COMPILER], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["auto"] is False and out["trials_for_auto"] == 0  # CPU's auto: off, and no trial compile paid for
    assert out["warnings"] == [f"torch.compile failed a trial compile on cpu: no C++ compiler found "
                               f"({tmp_path / 'no-such-g++'}): install g++ (e.g. build-essential) or set CXX; "
                               f"training runs uncompiled"]
    assert out["compiled"] is False
    assert len(out["losses"]) == 2 and all(math.isfinite(loss) for loss in out["losses"])  # it trained, eager


def test_a_failed_cuda_compile_names_what_is_missing(monkeypatch, tmp_path):
    """Triton's launchers want $CC (else gcc or clang on PATH); where that compiler is there, the error's root cause."""
    from fwray.core import hardware

    monkeypatch.setenv("CC", str(tmp_path / "no-such-gcc"))
    failed = RuntimeError("backend='inductor' raised")
    no_compiler = "no C compiler found: install gcc (e.g. build-essential) or set CC"
    assert hardware._what_is_missing("cuda", failed) == no_compiler
    monkeypatch.delenv("CC")
    if hardware._what_is_missing("cuda", failed).startswith(("no C compiler", "Python headers")):
        pytest.skip("this machine lacks a C compiler or Python's headers itself")
    failed.__cause__ = OSError("libcuda.so cannot be found\nsecond line")
    assert hardware._what_is_missing("cuda", failed) == "OSError: libcuda.so cannot be found"
