"""`python -m fwray.probe EXP.yaml [section.key=value ...]`: which micro-batch fits the card, and which is fastest.

A Ray Tune sweep over probe.batch_sizes x probe.activation_checkpointing (x probe.compile on a GPU). Every candidate
is a trial in a fresh worker process (reuse_actors=False, one trial at a time), so an OOM dies with its process and
leaves nothing behind for the next candidate. A trial runs the engine's real step (forward, backward, AdamW, the
configured dtype and compile) for probe.steps steps, then one evaluation forward at the evaluation batch size.

- On CUDA the usable memory is capped at probe.gpu_memory_gb (set_per_process_memory_fraction), so a big GPU
  emulates the target card; the trial measures peak allocated/reserved memory and tokens/s ("cuda").
- Without a GPU the trial predicts the CUDA peak with fwray.memory under FakeTensorMode ("cpu-estimate") and, when
  the step is small enough, times it on the CPU (tokens/s for information only: the CPU says nothing of GPU speed).

A candidate fits when its peak <= (1 - probe.margin) x cap; an OOM is a verdict ("does not fit"), not a crash.
Test hook: FWRAY_PROBE_INJECT_OOM=<batch_size>[:eval][,...] makes that candidate's trial raise torch.OutOfMemoryError
at step 1 (or during the evaluation); the driver reads it and hands it to the trials (Ray workers do not see
variables set after ray.init).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hardware, memory
from .config import Experiment

GIB = 2**30
INJECT_ENV = "FWRAY_PROBE_INJECT_OOM"
CPU_TIMING_MAX_FLOPS = 1e11  # CPU trials time the real step only below this (~10 s on one slow core)
TIE = 0.01  # tokens/s within 1% of the fastest count as a tie; the larger micro-batch wins


class ProbeError(RuntimeError):
    """The probe cannot decide, or nothing fits: one line saying what to do."""


@dataclass(frozen=True)
class ProbeJob:
    """What a trial needs, picklable."""

    exp: Experiment
    train_files: tuple[str, ...]  # empty: random tokens (memory and speed do not depend on the values)
    val_files: tuple[str, ...]
    use_gpu: bool
    cap_bytes: int | None  # None on CUDA: the whole card
    inject: str = ""  # FWRAY_PROBE_INJECT_OOM, read in the driver


# ---------------------------------------------------------------- one candidate (runs inside a Tune trial)


def accumulation_for(exp: Experiment, batch_size: int) -> int:
    """Accumulation steps that keep tokens per optimizer step nearest to the configured figure."""
    per_micro = batch_size * exp.model.block_size * exp.resources.num_workers
    return max(1, round(exp.tokens_per_step / per_micro))


def measure(job: ProbeJob, batch_size: int, activation_checkpointing: bool, compile: bool | None) -> dict:
    """Peak memory and tokens/s of one candidate; an OOM comes back as fits=False with where it happened."""
    exp, steps = job.exp, job.exp.probe.steps
    accum = min(accumulation_for(exp, batch_size), 2)  # the 2nd micro-batch runs with the 1st one's gradients alive
    eval_bs = exp.train.eval_batch_size or batch_size
    run = exp.with_changes("train", batch_size=batch_size, gradient_accumulation_steps=accum,
                           max_iters=exp.train.max_iters or steps)
    device = torch.device("cuda" if job.use_gpu else "cpu")
    out = {"batch_size": batch_size, "activation_checkpointing": activation_checkpointing, "compile": compile,
           "eval_batch_size": eval_bs, "probe_accumulation": accum, "status": "ok", "reason": "",
           "tokens_per_s": None}
    est = memory.estimate_peak_bytes(exp, batch_size, activation_checkpointing, eval_bs, accum)
    out["predicted_gb"] = est["peak"] / GIB
    if device.type == "cpu":
        out.update(method="cpu-estimate", peak_gb=est["peak"] / GIB)
        flops = _flops(run, batch_size * accum * steps + eval_bs)
        if flops > CPU_TIMING_MAX_FLOPS:
            out["reason"] = f"tokens/s not timed: {flops / 1e12:.0f} TFLOP is too much for a CPU"
            return out
    else:
        total = torch.cuda.get_device_properties(device).total_memory
        out.update(method="cuda", device=torch.cuda.get_device_name(device),
                   cap_gb=min(job.cap_bytes or total, total) / GIB)
        if job.cap_bytes:
            torch.cuda.set_per_process_memory_fraction(min(1.0, job.cap_bytes / total), device)
        torch.cuda.reset_peak_memory_stats(device)

    from .engine import Engine

    hooks = dict(item.partition(":")[::2] for item in job.inject.split(",") if item)  # "2,8:eval" -> {2: "", 8: eval}
    inject, inject_where = str(batch_size) in hooks, hooks.get(str(batch_size), "")
    stage = ["building the model"]
    engine = batches = None
    try:
        engine = Engine.build(run, device, activation_checkpointing=activation_checkpointing,
                              compile=compile if device.type == "cuda" else False)
        batches = _batches(job, run, batch_size, eval_bs)

        def train_batch(step):
            def get(micro):
                stage[0] = f"step {step}"
                if inject and inject_where != "eval" and step == 1:
                    raise torch.OutOfMemoryError(f"injected by {INJECT_ENV}")
                return batches.train_batch(step, micro)
            return get

        start = None
        for step in range(steps):
            if step == 1:  # step 0 carries compilation and allocator warm-up
                _sync(device)
                start = time.perf_counter()
            engine.step(step, train_batch(step))
        _sync(device)
        elapsed = time.perf_counter() - start
        stage[0] = "eval"

        def val_batch(i):
            if inject and inject_where == "eval":
                raise torch.OutOfMemoryError(f"injected by {INJECT_ENV}")
            return batches.val_batch(i)

        engine.evaluate(val_batch, 1)
        out["tokens_per_s"] = (steps - 1) * accum * batch_size * exp.model.block_size / elapsed
    except torch.OutOfMemoryError as e:
        where = "during eval" if stage[0] == "eval" else f"at {stage[0]}{_phase(e)}"
        out.update(status="oom", reason=f"OOM {where}" + (f" ({e})" if inject else ""))
    finally:
        del engine, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        stats = hardware.memory_stats(device)
        out.update(peak_alloc_gb=stats["peak_alloc_gb"], peak_reserved_gb=stats["peak_reserved_gb"],
                   peak_gb=stats["peak_reserved_gb"])
    return out


def _flops(exp: Experiment, sequences: int) -> float:
    from .engine import flops_per_token, gpt_config
    from .model import count_params

    return flops_per_token(exp, count_params(gpt_config(exp))) * sequences * exp.model.block_size


def _batches(job: ProbeJob, run: Experiment, batch_size: int, eval_bs: int):
    from .loader import Batches

    if job.train_files:
        return Batches.from_files(job.train_files, job.val_files, run.model.block_size, batch_size=batch_size,
                                  eval_batch_size=eval_bs, seed=run.train.seed)

    class Synthetic:  # random tokens: memory and speed do not depend on their values
        def train_batch(self, step, micro, b=batch_size):
            x = torch.randint(0, 50257, (b, run.model.block_size + 1))
            return x[:, :-1], x[:, 1:]

        def val_batch(self, i):
            return self.train_batch(0, 0, eval_bs)

    return Synthetic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase(e: BaseException) -> str:
    """' forward' / ' backward' / ' optimizer step' ...: read from the deepest engine.py line of the traceback."""
    lines = [f.line or "" for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("engine.py")]
    line = lines[-1] if lines else ""
    for needle, phase in (("get_batch", " loading the batch"), (".backward(", " backward"),
                          ("clip_grad", " gradient clipping"), ("optimizer", " optimizer step"),
                          ("model(", " forward"), ("Engine.build", " building the model")):
        if needle in line:
            return phase
    return ""


def _trial(config: dict, job: ProbeJob) -> None:
    from ray import tune

    tune.report(measure(job, config["batch_size"], config["activation_checkpointing"], config["compile"]))


# ---------------------------------------------------------------- the verdict (pure)


def decide(exp: Experiment, results: list[dict], cap_gb: float, method: str) -> dict:
    """Mark which candidates fit, pick one, recompute accumulation so tokens per step stay as configured."""
    p = exp.probe
    limit = (1 - p.margin) * cap_gb
    for r in results:
        r["fits"] = r["status"] == "ok" and r.get("peak_gb") is not None and r["peak_gb"] <= limit
    fitting = [r for r in results if r["fits"]]
    verdict = {"experiment": exp.name, "source": exp.source, "method": method, "cap_gb": cap_gb,
               "margin": p.margin, "limit_gb": limit, "candidates": results, "chosen": None,
               "configured": {"batch_size": exp.train.batch_size,
                              "gradient_accumulation_steps": exp.train.gradient_accumulation_steps,
                              "tokens_per_step": exp.tokens_per_step}}
    if not fitting:
        smallest = min(results, key=lambda r: (r["batch_size"], not r["activation_checkpointing"]))
        peak = f"peak {smallest['peak_gb']:.2f} GB" if smallest.get("peak_gb") is not None else smallest["reason"]
        verdict["error"] = (
            f"no candidate fits {cap_gb:.2f} GB with a {p.margin:.0%} margin (limit {limit:.2f} GB): the smallest, "
            f"micro-batch {smallest['batch_size']}, needs {peak}; list smaller probe.batch_sizes, add true to "
            f"probe.activation_checkpointing, or shrink the model / block_size")
        return verdict
    timed = method == "cuda" and all(r["tokens_per_s"] for r in fitting)
    if timed:  # fastest; near-ties go to the larger micro-batch
        best = max(r["tokens_per_s"] for r in fitting)
        pool = [r for r in fitting if r["tokens_per_s"] >= (1 - TIE) * best]
        rule = "fastest tokens/s that fits (within 1% counts as a tie: larger micro-batch)"
    else:  # CPU tokens/s do not predict the GPU's
        pool, rule = fitting, "largest micro-batch that fits (CPU tokens/s do not predict GPU speed)"
    pick = max(pool, key=lambda r: (r["batch_size"], not r["activation_checkpointing"],
                                    r["tokens_per_s"] or 0))
    accum = accumulation_for(exp, pick["batch_size"])
    tokens = pick["batch_size"] * exp.model.block_size * accum * exp.resources.num_workers
    verdict["chosen"] = {"batch_size": pick["batch_size"], "gradient_accumulation_steps": accum,
                         "activation_checkpointing": pick["activation_checkpointing"],
                         "tokens_per_step": tokens, "tokens_per_step_difference": tokens - exp.tokens_per_step,
                         "peak_gb": pick.get("peak_gb"), "method": pick.get("method"), "rule": rule}
    if pick["compile"] is not None:
        verdict["chosen"]["compile"] = pick["compile"]
    return verdict


def apply_verdict(exp: Experiment, verdict: dict) -> Experiment:
    """The experiment with the chosen micro-batch, accumulation (and activation checkpointing / compile) set."""
    chosen = verdict.get("chosen")
    if not chosen:
        raise ProbeError(verdict.get("error") or "the probe chose nothing")
    changes = {k: chosen[k] for k in ("batch_size", "gradient_accumulation_steps", "activation_checkpointing",
                                      "compile") if k in chosen}
    return exp.with_changes("train", **changes)


def table(verdict: dict) -> str:
    rows = [("candidate", "fits", "peak GB", "tokens/s", "method", "note")]
    for r in verdict["candidates"]:
        name = f"micro-batch {r['batch_size']}" + (" +AC" if r["activation_checkpointing"] else "") + (
            {True: " compiled", False: " eager", None: ""}[r["compile"]])
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "-"
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        note = r["reason"]
        if r["method"] == "cuda" and r.get("predicted_gb") is not None:
            note = f"predicted {r['predicted_gb']:.2f} GB; " + note
        rows.append((name, "yes" if r["fits"] else "no", peak, speed, r["method"], note.strip("; ")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    head = f"probe of {verdict['experiment']!r}: cap {verdict['cap_gb']:.2f} GB, margin {verdict['margin']:.0%} => " \
           f"fits when peak <= {verdict['limit_gb']:.2f} GB"
    c = verdict["chosen"]
    if c:
        diff = c["tokens_per_step_difference"]
        tail = (f"chosen: micro-batch {c['batch_size']} x {c['gradient_accumulation_steps']} accumulation"
                f"{' with activation checkpointing' if c['activation_checkpointing'] else ''} = "
                f"{c['tokens_per_step']:,} tokens per step (configured {verdict['configured']['tokens_per_step']:,}, "
                f"{diff:+,} = {diff / verdict['configured']['tokens_per_step']:+.2%}); rule: {c['rule']}")
    else:
        tail = f"nothing fits: {verdict['error']}"
    return "\n".join([head, *lines, tail])


# ---------------------------------------------------------------- the sweep (Ray Tune) and its record (MLflow)


def run_probe(exp: Experiment, cache_dir=None, manifest: dict | None = None, *, client=None,
              parent_run_id: str | None = None, out_dir=None, reuse: bool = False) -> dict:
    """Sweep the candidates with Ray Tune (ray must be initialised), save, print and track the verdict.

    cache_dir/manifest: the prepared data (None: random tokens). out_dir: where verdict.json goes (default
    .fwray/probe/<name>-<time>); reuse=True returns a verdict already saved there (a resumed run keeps its batch).
    """
    from ray import tune

    from . import tokens, tracking

    out_dir = Path(out_dir or Path(".fwray/probe") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if reuse and (out_dir / "verdict.json").is_file():
        print(f"probe: reusing the verdict in {out_dir / 'verdict.json'}")
        return json.loads((out_dir / "verdict.json").read_text())
    p = exp.probe
    if not p.batch_sizes:
        raise ProbeError(f"{exp.source}: probe.batch_sizes is empty: list the micro-batch sizes to try")
    use_gpu = hardware.pick_device(exp.resources.use_gpu).type == "cuda"
    if not use_gpu and p.gpu_memory_gb is None:
        raise ProbeError(f"{exp.source}: probe.gpu_memory_gb is not set and there is no GPU here to measure: set it "
                         f"to the memory of the card you will train on (e.g. probe.gpu_memory_gb=12)")
    files = {s: tuple(map(str, tokens.split_files(cache_dir, manifest, s))) if cache_dir else () for s in
             ("train", "val")}
    job = ProbeJob(exp, files["train"], files["val"], use_gpu,
                   int(p.gpu_memory_gb * GIB) if p.gpu_memory_gb else None, os.environ.get(INJECT_ENV, ""))
    space = {"batch_size": tune.grid_search(sorted(set(p.batch_sizes))),
             "activation_checkpointing": tune.grid_search(sorted(set(p.activation_checkpointing))),
             "compile": tune.grid_search(sorted(set(p.compile)) if use_gpu and p.compile else [None])}
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"probe: {_count(space)} candidate(s), one fresh process each, on {'the GPU' if use_gpu else 'the CPU'}",
          flush=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, job=job), {"cpu": 1, "gpu": 1 if use_gpu else 0}),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),  # a fresh process per trial
        run_config=tune.RunConfig(name="tune", storage_path=str(out_dir), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    results = [_result(r) for r in tuner.fit()]
    results.sort(key=lambda r: (r["batch_size"], r["activation_checkpointing"], str(r["compile"])))
    # on a GPU the trials say what the card holds: CUDA is never initialised here, in the training driver
    caps = [r["cap_gb"] for r in results if r.get("cap_gb")]
    cap_gb = min(caps) if caps else p.gpu_memory_gb
    if cap_gb is None:
        raise ProbeError(f"every probe trial failed before reaching the GPU: {results[0]['reason']}")
    verdict = decide(exp, results, cap_gb, "cuda" if use_gpu else "cpu-estimate")
    verdict["device"] = next((r["device"] for r in results if r.get("device")), "cpu")
    verdict["path"] = str(out_dir / "verdict.json")
    tokens.write_atomic(out_dir / "verdict.json", json.dumps(verdict, indent=2).encode())
    print(table(verdict), flush=True)
    print(f"probe: verdict saved in {verdict['path']}", flush=True)
    client = client or tracking.connect(exp)
    _track(client, exp, verdict, parent_run_id, out_dir)
    return verdict


def _count(space: dict) -> int:
    return len(list(itertools.product(*(v["grid_search"] for v in space.values()))))


def _result(r) -> dict:
    """A trial's metrics; a trial that crashed (not an OOM) becomes a candidate that does not fit."""
    if r.error is None and r.metrics and "status" in r.metrics:
        return {k: r.metrics[k] for k in r.metrics if k in _KEYS}
    err = str(r.error).strip().splitlines()[-1] if r.error else "no result"
    return {**{k: r.config[k] for k in ("batch_size", "activation_checkpointing", "compile")}, "status": "error",
            "reason": f"trial failed: {err}", "tokens_per_s": None, "method": "-"}


_KEYS = {"batch_size", "activation_checkpointing", "compile", "eval_batch_size", "probe_accumulation", "status",
         "reason", "tokens_per_s", "predicted_gb", "method", "peak_gb", "peak_alloc_gb", "peak_reserved_gb",
         "device", "cap_gb"}


def _track(client, exp: Experiment, verdict: dict, parent_run_id: str | None, out_dir: Path) -> None:
    from . import tracking

    probe_id = tracking.start_run(client, exp, f"probe-{out_dir.name}", {"fwray.kind": "probe"}, parent_run_id)
    tracking.log_params(client, probe_id, {**{f"probe.{k}": v for k, v in vars(exp.probe).items()},
                                           "device": verdict["device"], "method": verdict["method"],
                                           "cap_gb": verdict["cap_gb"], "limit_gb": verdict["limit_gb"]})
    log = tracking.RunLogger(client.tracking_uri, probe_id, out_dir)
    for r in verdict["candidates"]:
        name = f"bs{r['batch_size']}" + ("-ac" if r["activation_checkpointing"] else "") + (
            {True: "-compiled", False: "-eager", None: ""}[r["compile"]])
        trial_id = tracking.start_run(client, exp, name, {"fwray.kind": "probe-trial", "fwray.probe.reason":
                                                          r["reason"] or "ok"}, probe_id)
        tracking.log_params(client, trial_id, {k: r[k] for k in ("batch_size", "activation_checkpointing",
                                                                 "compile", "method") if k in r})
        tracking.RunLogger(client.tracking_uri, trial_id, out_dir).metrics(0, {
            "fits": float(r["fits"]), "peak_gb": r.get("peak_gb"), "tokens_per_s": r["tokens_per_s"],
            "predicted_gb": r.get("predicted_gb"), "peak_alloc_gb": r.get("peak_alloc_gb")})
        tracking.finish(client, trial_id, r["status"] != "error")
    c = verdict["chosen"]
    if c:
        log.metrics(0, {"chosen_batch_size": c["batch_size"], "chosen_accumulation": c["gradient_accumulation_steps"],
                        "tokens_per_step_difference": c["tokens_per_step_difference"]})
    log.artifact(out_dir / "verdict.json")
    tracking.finish(client, probe_id, c is not None)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwray.probe", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="an experiments/*.yaml file")
    parser.add_argument("overrides", nargs="*", help="section.key=value (e.g. probe.gpu_memory_gb=8)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random tokens instead of the prepared data (no data needed; same memory and speed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from .config import ConfigError, load
    from .tokens import TokenizerUnavailable

    try:
        exp = load(args.experiment, args.overrides)
        from . import prepare, ray_session, tracking

        client = tracking.connect(exp)
        ray_session.start()
        cache_dir, manifest = (None, None) if args.synthetic else prepare.prepare(exp)
        verdict = run_probe(exp, cache_dir, manifest, client=client)
        apply_verdict(exp, verdict)
    except (ConfigError, TokenizerUnavailable, ProbeError) as e:
        print(f"fwray: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    c = verdict["chosen"]
    print(f"train with: python -m fwray.run {args.experiment} train.batch_size={c['batch_size']} "
          f"train.gradient_accumulation_steps={c['gradient_accumulation_steps']}"
          + (" train.activation_checkpointing=true" if c["activation_checkpointing"] else "")
          + (f" train.compile={str(c['compile']).lower()}" if "compile" in c else "")
          + ("" if exp.probe.enabled else "   (or set probe.enabled: true)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
