"""`python -m fwray.probe EXP.yaml [section.key=value ...]`: which micro-batch fits the card, and which is fastest.

A Ray Tune sweep over probe.batch_sizes x probe.activation_checkpointing (x probe.compile on a GPU). Every candidate
is a trial in a fresh worker process (reuse_actors=False, one trial at a time) that runs `fwray.probe.trial.measure`: the
engine's real step under the target card's memory cap. A candidate fits when its peak <= (1 - probe.margin) x cap; an
OOM is a verdict ("does not fit"), not a crash; `fwray.probe.verdict.decide` picks one. When the largest candidate fits, the
verdict says so: the ceiling was not found. The verdict is saved as JSON and logged to MLflow, one nested run per
candidate.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path

from ray import tune

from .. import ray_session
from ..config import Experiment
from ..core import loader, tokens
from ..errors import ProbeError, last_line
from ..tracking.tracker import Tracker
from . import verdict as verdicts
from .trial import INJECT_ENV, ProbeJob, measure, usable_bytes


def _trial(config: dict, jobs: list[ProbeJob]) -> None:
    t = config["trial"]
    tune.report(measure(jobs[t["job"]], t["batch_size"], t["activation_checkpointing"], t["compile"]))


# ---------------------------------------------------------------- the sweep (Ray Tune) and its record (MLflow)


def run_probe(exp: Experiment, cache_dir=None, manifest: dict | None = None, *, tracker: Tracker | None = None,
              out_dir=None, reuse: bool = False) -> dict:
    """Sweep the candidates with Ray Tune (ray must be initialised), save, print and track the verdict.

    cache_dir/manifest: the prepared data (None: random tokens). tracker: where the verdict's run goes, nested under
    its parent run when it has one (default: a new Tracker, the run at the top level). out_dir: where verdict.json
    goes (default .fwray/probe/<name>-<time>); reuse=True returns a verdict already saved there (a resumed run keeps
    its batch).
    """
    out_dir = Path(out_dir or Path(".fwray/probe") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if reuse and (out_dir / "verdict.json").is_file():
        print(f"probe: reusing the verdict in {out_dir / 'verdict.json'}")
        return json.loads((out_dir / "verdict.json").read_text())
    p = exp.probe
    if not p.batch_sizes:
        raise ProbeError(f"{exp.source}: probe.batch_sizes is empty: list the micro-batch sizes to try")
    use_gpu = ray_session.use_gpu(exp.resources.use_gpu)  # the Ray cluster's GPUs, not this driver's torch
    if not use_gpu and p.gpu_memory_gb is None:
        raise ProbeError(f"{exp.source}: probe.gpu_memory_gb is not set and there is no GPU here to measure: set it "
                         f"to the memory of the card you will train on (e.g. probe.gpu_memory_gb=12)")
    files = {s: tuple(tokens.split_files(cache_dir, manifest, s)) if cache_dir else () for s in ("train", "val")}
    for split in ("train", "val") if cache_dir else ():  # too small for one window: one line, not a failed trial each
        loader.check_split(manifest, split, exp.model.block_size, exp.source)
    if not use_gpu:
        usable_bytes(exp)  # a card too small for its own overhead is one line here, not a failed trial each
    job = ProbeJob(exp, files["train"], files["val"], use_gpu, os.environ.get(INJECT_ENV, ""),
                   shard_sha256=tokens.shard_hashes(manifest) if cache_dir else None)
    grid = itertools.product(sorted(set(p.batch_sizes)), sorted(set(p.activation_checkpointing)),
                             sorted(set(p.compile)) if use_gpu and p.compile else [None])
    trials = [{"job": 0, "batch_size": b, "activation_checkpointing": ac, "compile": c} for b, ac, c in grid]
    print(f"probe: {len(trials)} candidate(s), one fresh process each, on {'the GPU' if use_gpu else 'the CPU'}",
          flush=True)
    results = sweep([job], trials, out_dir)
    # on a GPU the trials say what the card holds: CUDA is never initialised here, in the training driver
    caps = [r["cap_gb"] for r in results if r.get("cap_gb")]
    if not caps:
        raise ProbeError(f"every probe trial failed before measuring anything: {results[0]['reason']}")
    cap_gb = min(caps)
    verdict = verdicts.decide(exp, results, cap_gb, "cuda" if use_gpu else "cpu-estimate")
    verdict["device"] = next((r["device"] for r in results if r.get("device")), "cpu")
    verdict["path"] = str(out_dir / "verdict.json")
    tokens.write_atomic(out_dir / "verdict.json", json.dumps(verdict, indent=2).encode())
    print(verdicts.table(verdict), flush=True)
    print(f"probe: verdict saved in {verdict['path']}", flush=True)
    track_verdict(tracker or Tracker(exp), exp, verdict, out_dir)
    return verdict


def sweep(jobs: list[ProbeJob], trials: list[dict], out_dir: Path, cpus: int = 1) -> list[dict]:
    """Measure `trials` (each: job, an index into `jobs`; batch_size, activation_checkpointing, compile) with Ray Tune,
    one at a time, each in a fresh worker process with `cpus` CPUs (ray must be initialised). Returns their results
    in the order given; a trial that crashed (not an OOM) comes back with status "error"."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = [{**t, "index": i} for i, t in enumerate(trials)]
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, jobs=jobs), {"cpu": cpus, "gpu": 1 if jobs[0].use_gpu else 0}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=False),  # a fresh process per trial
        run_config=tune.RunConfig(name="tune", storage_path=str(out_dir), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    done = {r.config["trial"]["index"]: _result(r) for r in tuner.fit()}
    return [done[t["index"]] for t in trials]


def _result(r) -> dict:
    """A trial's metrics; a trial that crashed (not an OOM) becomes a candidate that does not fit."""
    if r.error is None and r.metrics and "status" in r.metrics:
        return {k: r.metrics[k] for k in r.metrics if k in _KEYS}
    err = last_line(r.error) if r.error else "no result"
    return {**{k: r.config["trial"][k] for k in ("batch_size", "activation_checkpointing", "compile")},
            "status": "error", "reason": f"trial failed: {err}", "tokens_per_s": None, "method": "-"}


_KEYS = {"batch_size", "activation_checkpointing", "compile", "eval_batch_size", "probe_accumulation", "status",
         "reason", "tokens_per_s", "predicted_gb", "method", "peak_gb", "peak_alloc_gb", "peak_reserved_gb",
         "device", "cap_gb", "measured_context_gb", "predicted_alloc_gb", "eval_batch_s", "checkpoint_s",
         "samples_s", "allocator", "sdpa_backend"}


def track_verdict(tracker: Tracker, exp: Experiment, verdict: dict, out_dir: Path) -> None:
    """The verdict as one of the tracker's runs (its outbox in `out_dir`), one nested run per candidate. An MLflow
    failure is a warning: the probe has its verdict."""
    probe = tracker.child(f"probe-{out_dir.name}", {"fwray.kind": "probe"}, out_dir)
    probe.params({**{f"probe.{k}": v for k, v in dataclasses.asdict(exp.probe).items()},
                  "device": verdict["device"], "method": verdict["method"],
                  "cap_gb": verdict["cap_gb"], "limit_gb": verdict["limit_gb"]})
    for r in verdict["candidates"]:
        name = f"bs{r['batch_size']}" + ("-ac" if r["activation_checkpointing"] else "") + (
            {True: "-compiled", False: "-eager", None: ""}[r["compile"]])
        trial = probe.child(name, {"fwray.kind": "probe-trial", "fwray.probe.reason": r["reason"] or "ok"})
        trial.params({k: r[k] for k in ("batch_size", "activation_checkpointing", "compile", "method", "allocator",
                                        "sdpa_backend") if k in r})
        trial.metrics(0, {"fits": float(r["fits"]), "peak_gb": r.get("peak_gb"), "tokens_per_s": r["tokens_per_s"],
                          "predicted_gb": r.get("predicted_gb"), "peak_alloc_gb": r.get("peak_alloc_gb")})
        trial.finish(r["status"] != "error")
    c = verdict["chosen"]
    if c:
        probe.metrics(0, {"chosen_batch_size": c["batch_size"], "chosen_accumulation": c["gradient_accumulation_steps"],
                          "tokens_per_step_difference": c["tokens_per_step_difference"]})
    probe.artifact(out_dir / "verdict.json")
    probe.finish(c is not None)
