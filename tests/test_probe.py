"""The OOM probe: memory estimates (pure), the verdict (pure), and a real Ray Tune sweep on CPU inside fwray.run."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fwray import config
from fwray.config import ModelConfig, TrainConfig
from fwray.core import layers, memory
from fwray.core.model import GPT, count_params
from fwray.errors import ProbeError
from fwray.probe import trial
from fwray.probe.verdict import apply_verdict, decide, probe_accumulation, table
from pipeline import sqlite_store

ROOT = Path(__file__).resolve().parent.parent
PROBE_CPU = ROOT / "experiments" / "probe-cpu.yaml"


def tiny(**train) -> config.Experiment:
    """The sections a probe trial reads; data comes from the job's token files, so there is no data section."""
    return config.Experiment(
        name="probe-test", model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32),
        train=TrainConfig(**{"batch_size": 2, "gradient_accumulation_steps": 8, "max_iters": 10, "compile": False,
                             **train}),
        probe=config.ProbeConfig(batch_sizes=(1, 2, 4, 8), steps=3, context_overhead_gb=0))


# ---------------------------------------------------------------- memory.py


def test_estimate_grows_with_batch_size():
    exp = tiny()
    peaks = [memory.estimate_peak_bytes(exp.model, exp.train, b)["peak"] for b in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and peaks[-1] > 1.5 * peaks[0]


def test_activation_checkpointing_lowers_the_train_peak():
    # small loss chunks so that the layers' activations, not the logits, dominate
    model = ModelConfig(n_layer=6, n_head=4, n_embd=256, block_size=256)
    train = TrainConfig(max_iters=10, loss_chunk_size=256)
    plain = memory.estimate_peak_bytes(model, train, 32)["train_peak"]
    checkpointed = memory.estimate_peak_bytes(model, train, 32, activation_checkpointing=True)["train_peak"]
    assert checkpointed < 0.7 * plain


def test_fake_estimate_matches_a_real_cpu_run():
    exp = tiny(loss_chunk_size=64)
    fake = memory.measure_peak_bytes(exp.model, exp.train, 4, dtype=torch.float32, fake=True)
    real = memory.measure_peak_bytes(exp.model, exp.train, 4, dtype=torch.float32, fake=False)
    assert fake["peak"] == pytest.approx(real["peak"], rel=0.05)
    n_params = count_params(exp.model)
    assert real["params"] == pytest.approx(4 * n_params, rel=0.01)
    assert real["train_peak"] > 4 * real["params"]  # weights, gradients, two AdamW moments, activations


def test_estimate_uses_the_cuda_dtype():
    exp = tiny()
    # auto is bf16 on CUDA, whatever the CPU does
    assert memory.estimate_peak_bytes(exp.model, exp.train, 1)["dtype"] == "bfloat16"
    assert memory.estimate_peak_bytes(exp.model, TrainConfig(dtype="float32"), 1)["dtype"] == "float32"


# CUDA autocast's fp32 ops (aten/src/ATen/autocast_mode.h: AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE), by aten
# name as a dispatch mode sees them: on CUDA a bf16 input to one of these is cast to fp32 (and saved so for backward);
# CPU autocast leaves them in bf16. The estimate has CUDA's sizes only while the model hands none of them bf16.
CUDA_AUTOCAST_FP32 = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
    "native_group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "nll_loss", "nll_loss_forward",
    "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "binary_cross_entropy_with_logits", "dist",
    "cdist", "renorm", "logsumexp", "prod", "softmax", "_softmax", "log_softmax", "_log_softmax", "cumprod", "cumsum",
    "linalg_vector_norm", "linalg_matrix_norm", "sum", "norm"}


def cuda_fp32_ops_given_bf16(model: ModelConfig) -> set[str]:
    """The ops of CUDA autocast's fp32 list that a training forward under CPU bf16 autocast hands a bf16 tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flagged = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in CUDA_AUTOCAST_FP32 and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
                                                  for t in tree_flatten((args, kwargs))[0]):
                self.flagged.add(name)
            return func(*args, **(kwargs or {}))

    gpt = GPT(model)
    x = torch.randint(0, 50257, (2, model.block_size))
    with Seen() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        gpt(x, x)
    return seen.flagged


@pytest.mark.parametrize("recipe", ["gpt2", "modern", "speedrun"])
def test_the_estimate_sees_cudas_dtypes(recipe, monkeypatch):
    """CPU and CUDA autocast cast linear and attention to bf16 alike, but CUDA runs its fp32 list in fp32: a model
    that hands one of those ops a bf16 tensor keeps a larger activation on a GPU than the CPU estimate counts (ReLU^2
    written as square(), a pow: +1.75 GB for the modern 9 x 640 model at micro-batch 20, measured on an H200)."""
    model = ModelConfig(recipe=recipe, n_layer=2, n_head=2, n_embd=64, block_size=32)
    assert cuda_fp32_ops_given_bf16(model) == set()
    if recipe != "gpt2":  # the control: the form that cost 1.75 GB on the GPU is caught
        monkeypatch.setattr(layers.ReLUSquared, "forward", lambda self, x: F.relu(x).square())
        assert cuda_fp32_ops_given_bf16(model) == {"pow"}


# ---------------------------------------------------------------- the verdict


def _row(b, peak, tok=None, status="ok", ac=False):
    return {"batch_size": b, "activation_checkpointing": ac, "compile": None, "status": status, "reason": "",
            "peak_gb": peak, "tokens_per_s": tok, "method": "cuda" if tok else "cpu-estimate"}


def test_verdict_keeps_tokens_per_step():
    exp = tiny()  # 2 x 32 x 8 = 512 tokens per step
    v = decide(exp, [_row(1, 1.0), _row(2, 2.0), _row(4, 3.0), _row(8, 9.0)], 4.0, "cpu-estimate")
    assert [r["fits"] for r in v["candidates"]] == [True, True, True, False]
    assert v["chosen"]["batch_size"] == 4 and v["chosen"]["gradient_accumulation_steps"] == 4
    new = apply_verdict(exp, v)
    assert new.tokens_per_step == exp.tokens_per_step == 512
    # 3 does not divide 512 / 32: the nearest accumulation, its difference shown
    v3 = decide(exp, [_row(3, 1.0)], 4.0, "cpu-estimate")
    assert v3["chosen"]["gradient_accumulation_steps"] == 5
    assert v3["chosen"]["tokens_per_step_difference"] == 3 * 32 * 5 - 512


def test_cuda_verdict_picks_fastest_and_ties_go_larger():
    exp = tiny()
    rows = [_row(1, 1.0, 900.0), _row(2, 2.0, 1000.0), _row(4, 3.0, 995.0), _row(8, 3.5, 700.0, status="oom")]
    v = decide(exp, rows, 4.0, "cuda")
    assert v["chosen"]["batch_size"] == 4  # within 1% of the fastest: the larger one
    v = decide(exp, [_row(1, 1.0, 900.0), _row(2, 2.0, 1000.0), _row(4, 3.0, 800.0)], 4.0, "cuda")
    assert v["chosen"]["batch_size"] == 2


def test_nothing_fits_names_the_smallest_its_peak_and_the_cap():
    exp = tiny()
    v = decide(exp, [_row(2, 5.0), _row(4, 7.0)], 4.0, "cpu-estimate")
    assert v["chosen"] is None
    with pytest.raises(ProbeError, match=r"micro-batch 2, needs peak 5.00 GB.*probe.batch_sizes"):
        apply_verdict(exp, v)
    assert "4.00 GB" in v["error"]


def test_usable_memory_is_the_card_less_its_overhead():
    gib = trial.GIB
    exp = tiny().with_changes("probe", gpu_memory_gb=12.0, context_overhead_gb=0.5)
    assert trial.usable_bytes(exp) == 11.5 * gib
    assert trial.usable_bytes(exp, free=10 * gib) == 10 * gib  # never more than the probing card has free
    measured = tiny().with_changes("probe", gpu_memory_gb=12.0, context_overhead_gb=None)  # overhead unset: measured on the probing card
    assert trial.usable_bytes(measured, measured_overhead=gib // 4) == 11.75 * gib
    assert trial.usable_bytes(measured) == (12 - memory.TYPICAL_CONTEXT_OVERHEAD_GB) * gib
    whole_card = tiny().with_changes("probe", gpu_memory_gb=None, context_overhead_gb=1.0)
    assert trial.usable_bytes(whole_card, total=80 * gib) == 79 * gib
    with pytest.raises(ProbeError, match="probe.context_overhead_gb"):
        trial.usable_bytes(tiny().with_changes("probe", gpu_memory_gb=0.4, context_overhead_gb=0.5))


def test_ddp_and_accumulation_trials_run_two_micro_steps():
    assert probe_accumulation(tiny(gradient_accumulation_steps=1), 2) == 1
    assert probe_accumulation(tiny(gradient_accumulation_steps=8), 2) == 2
    ddp = tiny(gradient_accumulation_steps=1).with_changes("resources", num_workers=2)
    assert probe_accumulation(ddp, 2) == 2  # DDP's buckets keep gradients alive through the forward


def test_synthetic_trial_batches_are_contiguous():
    """A trial without token files reads random batches laid out as the loader's: a pinned copy of a strided slice
    would stage through pageable memory and time a synchronous host-to-device copy."""
    exp = tiny()
    batches = trial._batches(trial.ProbeJob(exp, (), (), False), exp, 2, 3)
    for x, y in (batches.train_batch(0, 0), batches.val_batch(0)):
        assert x.is_contiguous() and y.is_contiguous() and x.shape == y.shape
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert batches.val_batch(0)[0].shape == (3, exp.model.block_size)


def test_verdict_says_when_the_ceiling_was_not_found():
    exp = tiny()
    v = decide(exp, [_row(1, 1.0), _row(2, 2.0)], 4.0, "cpu-estimate")
    assert "micro-batch 2, fits" in v["ceiling"] and "note:" in table(v)
    v = decide(exp, [_row(1, 1.0), _row(2, 9.0)], 4.0, "cpu-estimate")
    assert "ceiling" not in v


# ---------------------------------------------------------------- the sweep, for real


def test_ray_workers_start_with_both_allocator_variables(ray_session):
    from fwray.core import hardware

    @ray_session.remote(num_cpus=0)
    def allocator_env():
        return [os.environ.get(name) for name in hardware.ALLOC_CONF_ENVS]

    seen = ray_session.get(allocator_env.remote())
    assert seen == [os.environ[name] for name in hardware.ALLOC_CONF_ENVS] and all(seen)


def test_run_probes_admits_some_rejects_others_survives_oom_and_trains_with_the_chosen_size(ray_session, tmp_path,
                                                                                           cache, monkeypatch):
    """fwray.run with the probe on: a real Ray Tune sweep of 4 trials on this CPU against a pretend 0.2 GB card
    (experiments/probe-cpu.yaml), one trial running out of memory during a step and one during its evaluation, then
    the training run at the size the verdict chose, its accumulation adjusted to keep the tokens per step."""
    from mlflow.tracking import MlflowClient

    from fwray import run

    uri = sqlite_store(tmp_path / "mlflow.db")
    exp = config.load(PROBE_CPU, [
        "train.max_iters=4", "train.eval_interval=4", "train.log_interval=2", f"tracking.uri={uri}", f"resources.storage_path={tmp_path}/runs",
        f"data.cache_dir={cache}",  # the smoke sample's shared cache
        "tracking.register_model=false"])  # test_tracking's runs register theirs
    assert exp.probe.batch_sizes == (2, 4, 8, 16)  # the estimate fits 2 and 4 below the cap, not 8 or 16
    monkeypatch.setenv(trial.INJECT_ENV, "16,2:eval")  # 16 runs out at step 1, 2 during its evaluation
    assert run.run(exp) == 0

    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and (p / "config.yaml").is_file())
    trained = config.load(run_dir / "config.yaml")
    verdict = json.loads((run_dir / "probe" / "verdict.json").read_text())
    rows = {r["batch_size"]: r for r in verdict["candidates"]}
    assert [rows[b]["fits"] for b in (2, 4, 8, 16)] == [False, True, False, False]
    assert rows[16]["status"] == "oom" and rows[16]["reason"].startswith("OOM at step 1")
    assert rows[2]["reason"].startswith("OOM during eval")
    assert rows[8]["status"] == "ok" and rows[8]["peak_gb"] > verdict["limit_gb"]
    assert rows[4]["tokens_per_s"] > 0 and rows[4]["method"] == "cpu-estimate"
    # what the trial ran on: no CUDA allocator here, and the CPU's fused attention kernel for fp32
    assert rows[4]["allocator"] is None and rows[4]["sdpa_backend"] == "flash_attention"
    assert trained.train.batch_size == verdict["chosen"]["batch_size"] == 4
    assert trained.train.gradient_accumulation_steps == 4 and trained.tokens_per_step == exp.tokens_per_step
    assert verdict["chosen"]["tokens_per_step"] == exp.tokens_per_step

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("probe-cpu").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["train.batch_size"] == "4"
    probe_run = next(r for r in runs if r.data.tags.get("fwray.kind") == "probe")
    assert probe_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == probe_run.info.run_id]
    assert {int(r.data.params["batch_size"]): r.data.metrics["fits"] for r in trials} == {2: 0, 4: 1, 8: 0, 16: 0}
    assert {r.data.params["sdpa_backend"] for r in trials} == {"flash_attention"}
    assert [a.path for a in client.list_artifacts(probe_run.info.run_id)] == ["verdict.json"]
