"""The GPU check's sections: each runs alone in a fresh process (bench/child.py) and returns a dict of what it
measured, whose "checks" rows (figure, goal, held) make the closing table. Pure torch and the fwray core.

Every function takes `cuda`: False runs the same code on tiny shapes on the CPU (bench/gpu_check.py --cpu-smoke),
where what only CUDA can show is None.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch._dynamo  # noqa: F401  (each section's first optimizer imports it, ~1.2 s: imported here, the fork
                      # server that starts the sections pays that once; it initialises no CUDA)
import torch.nn.functional as F

from fwray import config
from fwray.core import hardware, loader
from fwray.core.checkpoint import to_cpu
from fwray.core.engine import Engine
from fwray.core.model import GPT, flops_per_token
from fwray.core.optim import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_4070 = ROOT / "experiments" / "4070.yaml"  # the recommended run: its model and train section
BATCH_4070 = config.load(EXPERIMENT_4070).train.batch_size  # its micro-batch, the one its probe expects to fit
GPT2_SHAPES = {
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
}
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)
CARD = {"gpu_memory_gb": 12, "context_overhead_gb": 0.5}  # the target: an RTX 4070 (as experiments/4070.yaml)
# torch's sync debug mode "warn" (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync) raises TORCH_WARN with this
# text; Python sees a UserWarning whose message starts with it (" (Triggered internally at ...)" follows)
SYNC_WARNING = "called a synchronizing CUDA operation"
COMPILE_NOTE = ("compile seconds: the first 3 steps of a new engine. cold: a fresh, empty Inductor cache "
                "(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) in the section's own process; warm: the same process "
                "after torch._dynamo.reset() with Inductor's in-memory caches cleared, reading the on-disk cache the "
                "cold compile filled")


def check(figure: str, value, goal: str = "-", held: bool | None = None) -> dict:
    """One row of the closing table; held None: no goal, or not measurable here."""
    return {"figure": figure, "value": value, "goal": goal, "held": held}


def experiment(shape: str, batch_size: int, steps: int, compile: bool, **train) -> config.Experiment:
    """124m/tiny: GPT-2's recipe with the card's probe settings. 4070/4070-tiny: experiments/4070.yaml as written
    (the modern recipe, Muon, its accumulation and probe section), the tiny one at a CPU's size. Evaluation and
    logging stay out of the way; `train` overrides the rest."""
    if shape.startswith("4070"):
        exp = config.load(EXPERIMENT_4070)
        if shape == "4070-tiny":
            exp = exp.with_changes("model", **TINY)
    else:
        exp = config.Experiment(name=f"gpu-check-{shape}", model=config.ModelConfig(**GPT2_SHAPES[shape]),
                                probe=config.ProbeConfig(steps=4, **CARD))
    return exp.with_changes("train", batch_size=batch_size, max_iters=steps, warmup_iters=2, compile=compile,
                            eval_iters=1, eval_interval=10**9, log_interval=10**9, **train)


def device_for(cuda: bool) -> torch.device:
    return hardware.cuda_device() if cuda else torch.device("cpu")


def synthetic_batches(folder: Path, block_size: int, batch_size: int) -> loader.Batches:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4_000_000), ("val", 400_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return loader.Batches.from_files([folder / "train.bin"], [folder / "val.bin"], block_size,
                                     batch_size=batch_size, seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- host syncs, counted


@dataclasses.dataclass
class SyncCount:
    count: int = 0


def count_sync_warnings(records: list[warnings.WarningMessage]) -> int:
    """How many of `records` are torch's host-sync warning."""
    return sum(1 for w in records if issubclass(w.category, UserWarning) and str(w.message).startswith(SYNC_WARNING))


@contextlib.contextmanager
def counting_host_syncs(cuda: bool):
    """Count the host syncs inside (CUDA: sync debug mode "warn", one warning per sync, recorded rather than raised,
    so a loop that syncs by design still runs to the end). Other warnings are passed on."""
    counted = SyncCount()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every sync, not once per source line
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    counted.count = count_sync_warnings(caught)
    for w in caught:
        if not count_sync_warnings([w]):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ---------------------------------------------------------------- probe: one candidate under the card's cap


def probe_trial(shape: str, batch_size: int, compile: bool, expected: str, cuda: bool) -> dict:
    """fwray.probe.trial.measure, as a probe's trial runs it: predicted (CPU estimate) vs measured peak under a 12 GB card's
    cap, reserved vs allocated, and an OOM that is a verdict."""
    from fwray.probe import trial

    exp = experiment(shape, batch_size, 10, compile)
    r = trial.measure(trial.ProbeJob(exp, (), (), cuda), batch_size, False, compile)
    as_expected = (r["status"] == "oom") == (expected == "oom")
    r.update(shape=shape, expected=expected, verdict_as_expected=as_expected,
             checks=[check(f"verdict {r['status']} at micro-batch {batch_size}", r["status"], expected, as_expected)])
    if r.get("method") == "cuda" and r["status"] == "ok":
        r["reserved_over_allocated"] = r["peak_reserved_gb"] / r["peak_alloc_gb"]
        r["predicted_reserved_error"] = err = r["predicted_gb"] / r["peak_reserved_gb"] - 1
        r["predicted_alloc_error"] = r["predicted_alloc_gb"] / r["peak_alloc_gb"] - 1
        r["checks"].append(check(f"predicted / measured reserved - 1 = {err:+.3f} (peak {r['peak_reserved_gb']:.2f}"
                                 f" GB)", err, "within 0.10" if not compile else "-",
                                 abs(err) <= 0.10 if not compile else None))
        # this process's own context: the caller never initialises CUDA (a 4070's is what probe.context_overhead_gb
        # assumes; a bigger card's may differ)
        r["checks"].append(check(f"card memory outside the allocator {r['measured_context_gb']:.2f} GB",
                                 r["measured_context_gb"]))
    return r


# ---------------------------------------------------------------- throughput, and what a step must not do


def _build_and_warm(exp: config.Experiment, device: torch.device, batches) -> tuple[Engine, float]:
    """An engine and the seconds of its first 3 steps (compilation happens there)."""
    engine = Engine.build(exp.model, exp.train, device)
    start = time.perf_counter()
    for s in range(3):
        engine.step(s, lambda m, s=s: batches.train_batch(s, m))
    sync(device)
    return engine, time.perf_counter() - start


def _profile_step(engine: Engine, batches, step: int, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step(step, lambda m: batches.train_batch(step, m))
        sync(device)
    names = [e.name for e in prof.events()]
    copies = [n for n in names if n.startswith("Memcpy HtoD")]
    attention = ("flash", "fmha", "attention", "sdpa", "cudnn")  # FlashAttention, cuDNN, memory-efficient kernels
    return {"sdpa_ops": sorted({n for n in names if n.startswith("aten::_scaled_dot_product")}),  # the backend chosen
            "attention_kernels": sorted({n for n in names if any(a in n.lower() for a in attention)
                                         and not n.startswith("aten::")})[:6],
            "htod_copies": sorted(set(copies)), "pinned_htod": bool(copies) and all("Pinned" in n for n in copies)}


def throughput(shape: str, batch_size: int, steps: int, cuda: bool) -> dict:
    """bf16, compiled, the experiment's optimizer: compile seconds (cold and warm), tokens/s, MFU, peak memory; host
    syncs counted in the timed steps (none: AdamW and Muon both skip a non-finite step on the device), no
    recompile after an evaluation, attention kernels and pinned host-to-device copies seen in a profile."""
    device = device_for(cuda)
    exp = experiment(shape, batch_size, 10**6, compile=cuda, gradient_accumulation_steps=1)
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:  # cold: nothing compiled before in this cache
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp, "inductor"))
            os.environ["TRITON_CACHE_DIR"] = str(Path(tmp, "triton"))
            torch.cuda.reset_peak_memory_stats(device)
        batches = synthetic_batches(Path(tmp), exp.model.block_size, batch_size)
        engine, cold = _build_and_warm(exp, device, batches)
        out = {"shape": shape, "model": dataclasses.asdict(exp.model), "optimizer": exp.train.optimizer,
               "micro_batch": batch_size, "compiled": engine.compiled, "compile_seconds_cold": cold,
               "compile_note": COMPILE_NOTE, "device": hardware.device_name(device), "checks": []}
        from torch._dynamo.utils import counters

        graphs_before = counters["stats"]["unique_graphs"]
        try:
            with counting_host_syncs(cuda) as syncs:
                start = time.perf_counter()
                for s in range(3, 3 + steps):
                    loss, _ = engine.step(s, lambda m, s=s: batches.train_batch(s, m))
            sync(device)
        except Exception as e:  # no speed from a loop that raised
            out["error"] = f"timed steps: {type(e).__name__}: {e}"[:2000]
            return out
        seconds = time.perf_counter() - start
        tok_s = steps * exp.tokens_per_step / seconds
        peak = hardware.peak_tflops(device, None)
        mfu = hardware.mfu(tok_s, flops_per_token(exp.model, engine.raw_model.num_params()), peak)
        out.update(tokens_per_s=tok_s, mfu=mfu, peak_tflops=peak, loss=float(loss), timed_steps=steps,
                   host_syncs=syncs.count if cuda else None, expected_host_syncs=0,
                   allocator=hardware.allocator_settings(device), **hardware.memory_stats(device))
        out["checks"] += [
            check(f"tokens/s {tok_s:,.0f}" + (f", MFU {mfu:.1%}" if mfu else ""), tok_s),
            check(f"host syncs in {steps} steps: {out['host_syncs']}", out["host_syncs"], "0",
                  syncs.count == 0 if cuda else None)]
        engine.evaluate(batches.val_batch, 2)
        for s in range(3 + steps, 6 + steps):
            engine.step(s, lambda m, s=s: batches.train_batch(s, m))
        sync(device)
        out["recompiled_after_eval"] = counters["stats"]["unique_graphs"] != graphs_before
        out["checks"].append(check("recompiled after an evaluation", out["recompiled_after_eval"], "no",
                                   not out["recompiled_after_eval"]))
        if cuda:
            out.update(_profile_step(engine, batches, 6 + steps, device))
            out["checks"] += [check(f"pinned host-to-device copies ({len(out['htod_copies'])} kinds)",
                                    out["pinned_htod"], "all pinned", out["pinned_htod"]),
                              check(f"attention: {', '.join(out['sdpa_ops']) or 'no SDPA op seen'}", out["sdpa_ops"])]
        del engine
        if out["compiled"]:
            torch._dynamo.reset()
            from torch._inductor.utils import clear_inductor_caches  # (clear_caches's older name, kept in 2.13)

            clear_inductor_caches()
            torch.cuda.empty_cache()
            _, out["compile_seconds_warm"] = _build_and_warm(exp, device, batches)
            out["checks"].append(check(f"compile s cold {cold:.0f} / warm {out['compile_seconds_warm']:.0f}",
                                       out["compile_seconds_warm"]))
    return out


# ---------------------------------------------------------------- a plain reference loop


def reference(shape: str, batch_size: int, steps: int, cuda: bool) -> dict:
    """nanoGPT's step on the same model and optimizer: full logits, one cross-entropy, compiled, bf16 autocast, no
    skip flag. bench/gpu_check.py divides the throughput section's tokens/s by this one's."""
    device = device_for(cuda)
    exp = experiment(shape, batch_size, 10**6, compile=cuda, gradient_accumulation_steps=1)
    torch.manual_seed(0)
    model = GPT(exp.model).to(device)

    def loss_fn(x, y):
        logits = model.logits(model.hidden(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    step_loss = torch.compile(loss_fn) if cuda else loss_fn
    optimizers = make_optimizer(model, exp.train).optimizers.values()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    with tempfile.TemporaryDirectory() as tmp:
        batches = synthetic_batches(Path(tmp), exp.model.block_size, batch_size)

        def one(s):
            x, y = (t.pin_memory().to(device, non_blocking=True) if cuda else t for t in batches.train_batch(s, 0))
            with autocast:
                loss = step_loss(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        for s in range(3):
            one(s)
        sync(device)
        start = time.perf_counter()
        for s in range(3, 3 + steps):
            one(s)
        sync(device)
        seconds = time.perf_counter() - start
    return {"shape": shape, "optimizer": exp.train.optimizer, "micro_batch": batch_size,
            "tokens_per_s": steps * exp.tokens_per_step / seconds}


# ---------------------------------------------------------------- non-finite step and resume


def _checks_shape(optimizer: str) -> str:
    return "4070-tiny" if optimizer == "muon" else "tiny"  # Muon: experiments/4070.yaml's recipe, at a tiny size


def nonfinite(optimizer: str, cuda: bool) -> dict:
    """A non-finite step is skipped on the device: weights and every optimizer state unchanged."""
    device = device_for(cuda)
    exp = experiment(_checks_shape(optimizer), 4, 10, compile=False, optimizer=optimizer,
                     gradient_accumulation_steps=1)
    engine = Engine.build(exp.model, exp.train, device)
    batch = loader.random_batch(4, exp.model.block_size)
    engine.step(0, lambda m: batch)
    before = {k: v.clone() for k, v in engine.raw_model.state_dict().items()}
    state = engine.optimizer.state  # every parameter's state: AdamW's moments and step counts, Muon's momentum
    moments = {(p, k): v.clone() for p, s in state.items() for k, v in s.items()}
    hook = engine.raw_model.transformer.ln_f.register_forward_hook(lambda mod, args, out: out * float("nan"))
    loss, bad = engine.step(1, lambda m: batch)
    hook.remove()
    weights_kept = all(torch.equal(v, before[k]) for k, v in engine.raw_model.state_dict().items())
    moments_kept = all(torch.equal(state[p][k], v) for (p, k), v in moments.items())
    loss_after, bad_after = engine.step(2, lambda m: batch)
    out = {"flagged": bool(bad), "weights_unchanged": weights_kept, "moments_unchanged": moments_kept,
           "next_step_finite": bool(torch.isfinite(loss_after)) and not bool(bad_after),
           "fused": bool(engine.optimizer.optimizers["adamw"].defaults.get("fused"))}
    held = all(out.values())
    out["checks"] = [check("non-finite step skipped (weights, optimizer state kept; next step finite)", held,
                           "yes", held)]
    return out


def resume(optimizer: str, cuda: bool) -> dict:
    """A state saved, loaded with weights_only=True and resumed gives the losses of an uninterrupted run (dropout
    on: they match only if the checkpoint restores the random generators)."""
    device = device_for(cuda)
    exp = experiment(_checks_shape(optimizer), 4, 16, compile=False, optimizer=optimizer,
                     gradient_accumulation_steps=1)
    exp = exp.with_changes("model", dropout=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        batches = synthetic_batches(Path(tmp), exp.model.block_size, 4)

        def run(engine, steps):
            return [float(engine.step(s, lambda m, s=s: batches.train_batch(s, m))[0]) for s in steps]

        straight = run(Engine.build(exp.model, exp.train, device), range(8))
        first = Engine.build(exp.model, exp.train, device)
        run(first, range(4))
        buf = io.BytesIO()
        torch.save(to_cpu(first.state(4, {})), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        del first
        second = Engine.build(exp.model, exp.train, device)
        second.load(state)
        resumed = run(second, range(4, 8))
    diff = max(abs(a - b) for a, b in zip(straight[4:], resumed))
    on_cpu = all(t.device.type == "cpu" for t in state["model"].values())
    return {"uninterrupted": straight[4:], "resumed": resumed, "max_loss_difference": diff, "state_on_cpu": on_cpu,
            "checks": [check(f"resumed losses - uninterrupted: max {diff:.2g}", diff, "0", diff == 0.0),
                       check("checkpoint state on the CPU", on_cpu, "yes", on_cpu)]}
