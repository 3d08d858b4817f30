"""The GPU check: fwray's CUDA paths run and measured on one GPU, with torch alone (no Ray, no MLflow).

  python bench/gpu_check.py                 # on a GPU machine: ~5 minutes on an H100/H200, JSON report in --out
  python bench/gpu_check.py --cpu-smoke     # tiny shapes on the CPU; CUDA-only checks are skipped and say so

Sections (the report is rewritten after each, so a run cut short still leaves what it measured):
  probe       the probe's trial function (fwray.trial.measure) in a fresh process per candidate under a 12 GB card's
              cap: predicted (CPU estimate) vs measured peak, reserved vs allocated, and an OOM that is a verdict
  throughput  the 124M preset and experiments/full.yaml's model, bf16, compiled, fused AdamW: compile seconds,
              tokens/s, MFU, peak memory; no host sync inside a step, no recompile after an evaluation, flash
              attention and pinned host-to-device copies seen in a profile
  reference   a plain loop over the same model with nanoGPT's loss (full logits, one cross-entropy), compiled, same
              micro-batch: fwray's tokens/s / the reference's
  nonfinite   fused AdamW skips a non-finite step on the device: weights and moments unchanged
  resume      a state saved, loaded with weights_only=True and resumed gives the losses of an uninterrupted run
  nonfinite_muon, resume_muon   the same two with train.optimizer = muon (Muon's skip reads the flag back)
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fwray import config  # noqa: E402
from fwray.core import hardware, loader  # noqa: E402
from fwray.core.checkpoint import to_cpu  # noqa: E402
from fwray.core.engine import Engine  # noqa: E402
from fwray.core.model import GPT, flops_per_token  # noqa: E402

GIB = 2**30
SHAPES = {
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "full": dict(n_layer=12, n_head=8, n_embd=512, block_size=1024),  # experiments/full.yaml's model
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    # the modern recipe (rotary, RMSNorm, QK-norm, ReLU^2, untied head, soft-cap), trained with Muon as it defaults to
    "124m-modern": dict(n_layer=12, n_head=6, n_embd=768, block_size=1024, recipe="modern"),
    "tiny-modern": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, recipe="modern"),
}
CARD = {"gpu_memory_gb": 12, "context_overhead_gb": 0.5}  # the target: an RTX 4070, as experiments/full.yaml says


def experiment(shape: str, batch_size: int, steps: int, compile: bool, dropout: float = 0.0,
               **train) -> config.Experiment:
    # built from the sections it uses: the core needs no data section
    if SHAPES[shape].get("recipe") == "modern":
        train = {"optimizer": "muon", "schedule": "wsd", **train}
    return config.Experiment(
        name=f"gpu-check-{shape}", model=config.ModelConfig(**SHAPES[shape], dropout=dropout),
        train=config.TrainConfig(batch_size=batch_size, max_iters=steps, warmup_iters=2, compile=compile,
                                 eval_iters=1, eval_interval=10**9, log_interval=10**9, **train),
        probe=config.ProbeConfig(steps=4, **CARD))


class Report:
    """The JSON report, rewritten whole (atomically) after every section."""

    def __init__(self, path: Path, mode: str):
        self.path = path
        self.data = {"mode": mode, "torch": torch.__version__, "python": platform.python_version(),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "allocator": os.environ.get(hardware.ALLOC_CONF_ENV), "sections": {}}

    def section(self, name: str, fn, *args) -> None:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn(*args)
        except Exception as e:  # a broken section is a finding: record it and go on to the next
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.data["sections"][name] = result
        print(json.dumps(result, indent=1, default=str)[:4000], flush=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def synthetic_batches(folder: Path, block_size: int, batch_size: int) -> loader.Batches:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4_000_000), ("val", 400_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    return loader.Batches.from_files([folder / "train.bin"], [folder / "val.bin"], block_size,
                                     batch_size=batch_size, seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- probe: trials in fresh processes


def _trial(queue, shape: str, batch_size: int, use_gpu: bool, compile: bool) -> None:
    from fwray.probe import trial

    exp = experiment(shape, batch_size, 10, compile)
    queue.put(trial.measure(trial.ProbeJob(exp, (), (), use_gpu), batch_size, False, compile))


def probe_section(cuda: bool) -> dict:
    if cuda:  # (shape, micro-batch, compile, expected verdict)
        cases = [("124m", 12, False, "fits"), ("124m", 16, False, "fits"), ("124m", 32, False, "oom"),
                 ("full", 14, False, "fits"), ("124m", 12, True, "fits")]
    else:
        cases = [("tiny", 2, False, "fits"), ("tiny", 8, False, "fits")]
    ctx = multiprocessing.get_context("spawn")  # a fresh process per candidate, as Ray Tune's trials
    trials = []
    for shape, batch_size, compile, expected in cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_trial, args=(queue, shape, batch_size, cuda, compile))
        proc.start()
        proc.join(timeout=300)
        r = queue.get(timeout=5) if proc.exitcode == 0 else {"status": "crash", "exitcode": proc.exitcode}
        r.update(shape=shape, expected=expected)
        if r.get("method") == "cuda" and r["status"] == "ok":
            r["reserved_over_allocated"] = r["peak_reserved_gb"] / r["peak_alloc_gb"]
            r["predicted_reserved_error"] = r["predicted_gb"] / r["peak_reserved_gb"] - 1
            r["predicted_alloc_error"] = r["predicted_alloc_gb"] / r["peak_alloc_gb"] - 1
        r["verdict_as_expected"] = (r["status"] == "oom") == (expected == "oom") and r["status"] != "crash"
        trials.append(r)
    errors = [abs(t["predicted_reserved_error"]) for t in trials if "predicted_reserved_error" in t and
              not t["compile"]]
    return {"trials": trials, "all_verdicts_as_expected": all(t["verdict_as_expected"] for t in trials),
            "worst_eager_prediction_error": max(errors) if errors else None, "goal": "within 0.10"}


# ---------------------------------------------------------------- throughput, and what a step must not do


def _profile_step(engine: Engine, batches, step: int, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step(step, lambda m: batches.train_batch(step, m))
        sync(device)
    names = [e.name for e in prof.events()]
    copies = [n for n in names if n.startswith("Memcpy HtoD")]
    return {"flash_attention_kernels": sorted({n for n in names if "flash" in n.lower()})[:4],
            "htod_copies": sorted(set(copies)),
            "pinned_htod": bool(copies) and all("Pinned" in n for n in copies)}


def throughput(shape: str, batch_size: int, steps: int, cuda: bool) -> dict:
    device = hardware.cuda_device() if cuda else torch.device("cpu")
    exp = experiment(shape, batch_size, 10**6, compile=cuda)
    with tempfile.TemporaryDirectory() as tmp:
        batches = synthetic_batches(Path(tmp), exp.model.block_size, batch_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        engine = Engine.build(exp.model, exp.train, device)
        start = time.perf_counter()
        for s in range(3):  # compilation happens in the first steps
            engine.step(s, lambda m, s=s: batches.train_batch(s, m))
        sync(device)
        compile_s = time.perf_counter() - start
        out = {"shape": shape, "micro_batch": batch_size, "compiled": engine.compiled, "compile_seconds": compile_s}

        from torch._dynamo.utils import counters
        graphs_before = counters["stats"]["unique_graphs"]
        if cuda:
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside the timed steps raises
        try:
            start = time.perf_counter()
            for s in range(3, 3 + steps):
                loss, _ = engine.step(s, lambda m, s=s: batches.train_batch(s, m))
            out["host_sync_in_step"] = False
        except RuntimeError as e:
            out["host_sync_in_step"] = f"{e}"[:300]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        sync(device)
        seconds = time.perf_counter() - start
        tok_s = steps * exp.tokens_per_step / seconds
        n_params = engine.raw_model.num_params()
        peak = hardware.peak_tflops(device, None)
        out.update(tokens_per_s=tok_s, mfu=hardware.mfu(tok_s, flops_per_token(exp.model, n_params), peak),
                   peak_tflops=peak, loss=float(loss), **hardware.memory_stats(device))
        engine.evaluate(batches.val_batch, 2)
        for s in range(3 + steps, 6 + steps):
            engine.step(s, lambda m, s=s: batches.train_batch(s, m))
        sync(device)
        out["recompiled_after_eval"] = counters["stats"]["unique_graphs"] != graphs_before
        if cuda:
            out.update(_profile_step(engine, batches, 6 + steps, device))
        del engine
        if cuda:
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- a plain reference loop


def reference(shape: str, batch_size: int, steps: int, cuda: bool) -> dict:
    """nanoGPT's step on the same model: full logits, one cross-entropy, compiled, fused AdamW, bf16 autocast."""
    device = hardware.cuda_device() if cuda else torch.device("cpu")
    exp = experiment(shape, batch_size, 10**6, compile=cuda)
    torch.manual_seed(0)
    model = GPT(exp.model).to(device)

    def loss_fn(x, y):
        logits = model.lm_head(model.hidden(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    step_loss = torch.compile(loss_fn) if cuda else loss_fn
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    with tempfile.TemporaryDirectory() as tmp:
        batches = synthetic_batches(Path(tmp), exp.model.block_size, batch_size)

        def one(s):
            x, y = (t.pin_memory().to(device, non_blocking=True) if cuda else t for t in batches.train_batch(s, 0))
            with autocast:
                loss = step_loss(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        for s in range(3):
            one(s)
        sync(device)
        start = time.perf_counter()
        for s in range(3, 3 + steps):
            one(s)
        sync(device)
        seconds = time.perf_counter() - start
    return {"shape": shape, "micro_batch": batch_size, "tokens_per_s": steps * exp.tokens_per_step / seconds}


# ---------------------------------------------------------------- non-finite step and resume


def nonfinite(cuda: bool, optimizer: str = "adamw") -> dict:
    device = hardware.cuda_device() if cuda else torch.device("cpu")
    exp = experiment("tiny", 4, 10, compile=False, optimizer=optimizer)
    engine = Engine.build(exp.model, exp.train, device)
    x = torch.randint(0, 50257, (4, exp.model.block_size + 1))
    engine.step(0, lambda m: (x[:, :-1], x[:, 1:]))
    before = {k: v.clone() for k, v in engine.raw_model.state_dict().items()}
    # every parameter's state: AdamW's moments and step counts, Muon's momentum buffers
    state = engine.optimizer.state
    moments = {(p, k): v.clone() for p, s in state.items() for k, v in s.items()}
    hook = engine.raw_model.transformer.ln_f.register_forward_hook(lambda mod, args, out: out * float("nan"))
    loss, bad = engine.step(1, lambda m: (x[:, :-1], x[:, 1:]))
    hook.remove()
    weights_kept = all(torch.equal(v, before[k]) for k, v in engine.raw_model.state_dict().items())
    moments_kept = all(torch.equal(state[p][k], v) for (p, k), v in moments.items())
    loss_after, bad_after = engine.step(2, lambda m: (x[:, :-1], x[:, 1:]))
    return {"flagged": bool(bad), "weights_unchanged": weights_kept, "moments_unchanged": moments_kept,
            "next_step_finite": bool(torch.isfinite(loss_after)) and not bool(bad_after),
            "fused": bool(engine.optimizer.optimizers["adamw"].defaults.get("fused"))}


def resume(cuda: bool, optimizer: str = "adamw") -> dict:
    device = hardware.cuda_device() if cuda else torch.device("cpu")
    # dropout draws from the random generators: the resumed losses match only if the checkpoint restores them
    exp = experiment("full" if cuda else "tiny", 4, 16, compile=False, dropout=0.1, optimizer=optimizer)
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
    diffs = [abs(a - b) for a, b in zip(straight[4:], resumed)]
    return {"uninterrupted": straight[4:], "resumed": resumed, "max_loss_difference": max(diffs),
            "state_on_cpu": all(t.device.type == "cpu" for t in state["model"].values())}


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU; CUDA-only checks skipped")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on a GPU, 3 on the CPU)")
    args = p.parse_args(argv)
    hardware.configure_allocator()  # before CUDA starts: the allocator the probe and training use
    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu-smoke on a machine without a GPU", file=sys.stderr)
        return 2
    steps = args.steps or (30 if cuda else 3)
    report = Report(Path(args.out), "cuda" if cuda else "cpu-smoke")
    report.section("probe", probe_section, cuda)
    shapes = [("124m", 12), ("full", 14), ("124m-modern", 12)] if cuda else [("tiny", 4), ("tiny-modern", 4)]
    for shape, batch_size in shapes:
        report.section(f"throughput_{shape}", throughput, shape, batch_size, steps, cuda)
    report.section("reference", lambda: _ratio(report, shapes[0], steps, cuda))
    report.section("nonfinite", nonfinite, cuda)
    report.section("resume", resume, cuda)
    report.section("nonfinite_muon", nonfinite, cuda, "muon")
    report.section("resume_muon", resume, cuda, "muon")
    if not cuda:
        report.data["skipped"] = ("CUDA only: probe trials under a CUDA cap (the CPU estimate runs instead), "
                                  "compilation, MFU, host-sync debug mode, flash attention and pinned-copy profile")
        Path(args.out).write_text(json.dumps(report.data, indent=1, default=str))
    failed = [n for n, s in report.data["sections"].items() if "error" in s]
    print(f"gpu_check: report in {args.out}; sections with errors: {failed or 'none'}")
    return 1 if failed else 0


def _ratio(report: Report, shape_batch, steps: int, cuda: bool) -> dict:
    shape, batch_size = shape_batch
    ref = reference(shape, batch_size, steps, cuda)
    ours = report.data["sections"].get(f"throughput_{shape}", {}).get("tokens_per_s")
    return {**ref, "fwray_tokens_per_s": ours, "fwray_over_reference": ours / ref["tokens_per_s"] if ours else None,
            "goal": ">= 1.0"}


if __name__ == "__main__":
    sys.exit(main())
