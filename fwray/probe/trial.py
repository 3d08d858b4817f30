"""One probe candidate measured: the engine's real step at a micro-batch, its peak memory and tokens/s. Pure torch.

A trial runs the real step (forward, backward, AdamW, the configured dtype and compile) for probe.steps steps, then
one evaluation forward at the evaluation batch size, in a process of its own (Ray Tune's trial, or bench/gpu_check.py's
fresh process), so an OOM dies with it and leaves nothing behind for the next candidate.

The cap is what PyTorch may reserve on the target card: probe.gpu_memory_gb less what that card loses outside the
allocator (CUDA context, cuBLAS, a display: probe.context_overhead_gb, else measured on the card the trial runs on).
Probe and training run the same allocator configuration (fwray.core.hardware.ALLOC_CONF); a trial records the allocator's
effective setting and the attention kernel its model runs (on a smaller card emulated, that card's choice).
- On CUDA the allocator is capped there (set_per_process_memory_fraction), so a big GPU emulates the target card;
  the trial measures peak reserved (and allocated) memory and tokens/s ("cuda").
- Without a GPU the trial predicts the CUDA peak with fwray.core.memory under FakeTensorMode ("cpu-estimate": allocated
  bytes plus the allocator's slack, to compare reserved with reserved) and, when the step is small enough, times it
  on the CPU (tokens/s for information only: the CPU says nothing of GPU speed).

Test hook: FWRAY_PROBE_INJECT_OOM=<batch_size>[:eval][,...] makes that candidate's trial raise torch.OutOfMemoryError
at step 1 (or during the evaluation); the driver reads it and hands it to the trials (Ray workers do not see
variables set after ray.init).
"""
from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass

import torch

from ..config import Experiment
from ..core import checkpoint, hardware, memory, tokens
from ..core.engine import Engine
from ..core.loader import Batches, random_batch
from ..core.model import count_params, flops_per_token
from ..errors import ProbeError
from ..storage import node_cache
from ..train import artifacts
from .verdict import probe_accumulation

GIB = 2**30
INJECT_ENV = "FWRAY_PROBE_INJECT_OOM"
CPU_TIMING_MAX_FLOPS = 1e11  # CPU trials time the real step only below this (~10 s on one slow core)


@dataclass(frozen=True)
class ProbeJob:
    """What a trial needs, picklable."""

    exp: Experiment
    train_files: tuple[str, ...]  # empty: random tokens (memory and speed do not depend on the values)
    val_files: tuple[str, ...]
    use_gpu: bool
    inject: str = ""  # FWRAY_PROBE_INJECT_OOM, read in the driver
    # CPU trials time the step only below this; fwray.plan raises it to time small models on a CPU it plans for
    cpu_timing_max_flops: float = CPU_TIMING_MAX_FLOPS
    # fwray.plan: also time one evaluation batch and one checkpoint write (what each evaluation of a run costs)
    time_evaluation: bool = False
    # untimed steps first: step 0 carries compilation and allocator warm-up; on a CPU the next few still run slow
    # (a run's tokens/s leaves out its first log interval for the same reason)
    warmup_steps: int = 1
    shard_sha256: dict[str, str] | None = None  # checks the node's copy of shards on object storage (node_cache)


# ---------------------------------------------------------------- one candidate (runs inside a Tune trial)


def usable_bytes(exp: Experiment, total: int | None = None, free: int | None = None,
                 measured_overhead: int | None = None) -> int:
    """What PyTorch's allocator may reserve on the target card: probe.gpu_memory_gb (else this card's `total`) less
    what the card loses outside the allocator (probe.context_overhead_gb; else `measured_overhead`, measured on the
    card the probe runs on; else a typical figure), and never more than this card has `free`."""
    p = exp.probe
    overhead = p.context_overhead_gb
    if overhead is None:
        overhead = (measured_overhead / GIB if measured_overhead is not None else memory.TYPICAL_CONTEXT_OVERHEAD_GB)
    card = p.gpu_memory_gb * GIB if p.gpu_memory_gb is not None else total
    usable = int(card - overhead * GIB)
    if usable <= 0:
        raise ProbeError(f"{exp.source}: probe.gpu_memory_gb = {p.gpu_memory_gb} leaves nothing once the card's "
                         f"{overhead:.2f} GB outside PyTorch (CUDA context, display) are taken: raise "
                         f"probe.gpu_memory_gb or set probe.context_overhead_gb")
    return min(usable, free) if free is not None else usable


def measure(job: ProbeJob, batch_size: int, activation_checkpointing: bool, compile: bool | None) -> dict:
    """Peak memory and tokens/s of one candidate; an OOM comes back as fits=False with where it happened.

    peak_gb is reserved memory on both sides of the comparison: measured on a GPU (under a cap set to the target
    card's usable memory), estimated without one (fwray.core.memory's allocated bytes, plus the allocator's slack)."""
    exp = job.exp
    accum = probe_accumulation(exp, batch_size)
    eval_bs = exp.train.eval_batch_size or batch_size
    run = exp.with_changes("train", batch_size=batch_size, gradient_accumulation_steps=accum,
                           max_iters=exp.train.max_iters or exp.probe.steps,
                           **({} if compile is None else {"compile": compile}))
    out = {"batch_size": batch_size, "activation_checkpointing": activation_checkpointing, "compile": compile,
           "eval_batch_size": eval_bs, "probe_accumulation": accum, "status": "ok", "reason": "",
           "tokens_per_s": None}
    est = memory.estimate_peak_bytes(exp.model, exp.train, batch_size, activation_checkpointing, eval_bs, accum)
    out.update(predicted_gb=est["reserved"] / GIB, predicted_alloc_gb=est["peak"] / GIB)
    if job.use_gpu:
        device = _cap_the_card(exp, out)
    else:
        device = torch.device("cpu")
        out.update(method="cpu-estimate", peak_gb=est["reserved"] / GIB, cap_gb=usable_bytes(exp) / GIB)
        flops = _flops(run, batch_size * accum * exp.probe.steps + eval_bs)
        if flops > job.cpu_timing_max_flops:
            out["reason"] = f"tokens/s not timed: {flops / 1e12:.0f} TFLOP is too much for a CPU"
            return out
    _run_the_step(job, run, device, activation_checkpointing, out)
    if device.type == "cuda":
        stats = hardware.memory_stats(device)
        out.update(peak_alloc_gb=stats["peak_alloc_gb"], peak_reserved_gb=stats["peak_reserved_gb"],
                   peak_gb=stats["peak_reserved_gb"])
    return out


def _cap_the_card(exp: Experiment, out: dict) -> torch.device:
    """The CUDA device, its allocator capped at the target card's usable memory; the cap and card go into `out`."""
    hardware.configure_allocator()  # before CUDA starts in this fresh process: the allocator training uses
    device = hardware.cuda_device()
    overhead = hardware.context_overhead_bytes(device)
    free, total = torch.cuda.mem_get_info(device)
    cap = usable_bytes(exp, total, free + torch.cuda.memory_reserved(device), overhead)
    out.update(method="cuda", device=torch.cuda.get_device_name(device), cap_gb=cap / GIB,
               measured_context_gb=overhead / GIB)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    torch.cuda.reset_peak_memory_stats(device)
    if exp.probe.gpu_memory_gb is not None and exp.probe.gpu_memory_gb * GIB < total:
        hardware.attend_as_consumer_cards()  # emulating a smaller card: its attention kernel, not this card's
    return device


def _run_the_step(job: ProbeJob, run: Experiment, device: torch.device, activation_checkpointing: bool,
                  out: dict) -> None:
    """probe.steps real steps (timed after the warm-up) and one evaluation, into `out`; an OOM is recorded with the
    stage it reached, and everything the trial allocated is released before the peak is read."""
    batch_size, eval_bs = out["batch_size"], out["eval_batch_size"]
    hooks = dict(item.partition(":")[::2] for item in job.inject.split(",") if item)  # "2,8:eval" -> {2: "", 8: eval}
    inject, inject_where = str(batch_size) in hooks, hooks.get(str(batch_size), "")
    stage = ["building the model"]
    engine = batches = None
    try:
        engine = Engine.build(run.model, run.train, device, activation_checkpointing=activation_checkpointing,
                              # resolved as training resolves it: where compilation fails, one line and eager
                              compile=None if device.type == "cuda" else False)
        batches = _batches(job, run, batch_size, eval_bs)
        out.update(allocator=hardware.allocator_settings(device), sdpa_backend=_sdpa_backend(engine, batches))

        def train_batch(step):
            def get(micro):
                stage[0] = f"step {step} loading the batch"
                if inject and inject_where != "eval" and step == 1:
                    raise torch.OutOfMemoryError(f"injected by {INJECT_ENV}")
                batch = batches.train_batch(step, micro)
                stage[0] = f"step {step}"  # forward, backward or the optimizer step
                return batch
            return get

        def val_batch(i):
            if inject and inject_where == "eval":
                raise torch.OutOfMemoryError(f"injected by {INJECT_ENV}")
            return batches.val_batch(i)

        elapsed, timed_steps = _timed_steps(engine, train_batch, job.exp.probe.steps, job.warmup_steps, device)
        stage[0] = "eval"
        engine.evaluate(val_batch, 1)
        out["tokens_per_s"] = timed_steps * out["probe_accumulation"] * batch_size * run.model.block_size / elapsed
        if job.time_evaluation:  # warm now: two more batches, timed
            start = time.perf_counter()
            engine.evaluate(val_batch, 2)  # .item() inside: waits for the device
            out["eval_batch_s"] = (time.perf_counter() - start) / 2
            out.update(_evaluation_extras(engine, run))
    except torch.OutOfMemoryError as e:
        where = "during eval" if stage[0] == "eval" else f"at {stage[0]}"
        out.update(status="oom", reason=f"OOM {where}" + (f" ({e})" if inject else ""))
    finally:
        del engine, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed_steps(engine: Engine, train_batch, steps: int, warmup_steps: int, device: torch.device
                 ) -> tuple[float, int]:
    """Seconds taken by the steps after the untimed warm-up ones, and how many they were."""
    warmup = min(warmup_steps, steps - 1)
    start = None
    for step in range(steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        engine.step(step, train_batch(step))
    _sync(device)
    return time.perf_counter() - start, steps - warmup


def _sdpa_backend(engine: Engine, batches) -> str:
    """The attention kernel(s) torch picks for this model's q/k/v in training: one sequence's eager forward, with
    gradients, under the step's autocast (torch chooses by head size, dtype and layout, not by the batch size)."""
    x = engine.to_device(batches.train_batch(0, 0)[0][:1])
    with hardware.RecordSdpaBackends() as seen, engine.autocast():
        engine.raw_model.hidden(x)
    return "+".join(sorted(set(seen.backends))) or "none"


def _evaluation_extras(engine: Engine, exp: Experiment) -> dict:
    """Seconds of what a run does at an evaluation besides its forward passes: the training state written as a
    checkpoint (Ray then copies it into its storage), and the sample generations (fwray.train.artifacts)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        checkpoint.save_state(tmp, engine.state(0, {}), exp)
        saved = time.perf_counter()
    enc = tokens.get_tokenizer(exp.data.tokenizer)
    start_samples = time.perf_counter()
    artifacts.samples_text(engine.raw_model, enc, 0, artifacts.PROMPTS[:artifacts.SAMPLE_COUNT],
                           artifacts.SAMPLE_TOKENS, seed=exp.train.seed)
    return {"checkpoint_s": saved - start, "samples_s": time.perf_counter() - start_samples}


def _flops(exp: Experiment, sequences: int) -> float:
    return flops_per_token(exp.model, count_params(exp.model)) * sequences * exp.model.block_size


def _batches(job: ProbeJob, run: Experiment, batch_size: int, eval_bs: int):
    if job.train_files:
        train_files, val_files = (node_cache.local_files(files, job.shard_sha256, run.data.node_cache_dir)
                                  for files in (job.train_files, job.val_files))
        return Batches.from_files(train_files, val_files, run.model.block_size, batch_size=batch_size,
                                  eval_batch_size=eval_bs, seed=run.train.seed)

    class Synthetic:  # random tokens: memory and speed do not depend on their values
        def train_batch(self, step, micro, b=batch_size):
            return random_batch(b, run.model.block_size)

        def val_batch(self, i):
            return self.train_batch(0, 0, eval_bs)

    return Synthetic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
