"""fwray.plan's boundary: the card it plans for, the data's size, the --measure trials (Ray Tune) and the plan's
MLflow run. `python -m fwray.plan` is fwray/plan/__main__.py; the arithmetic stays pure in planner.py and family.py."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import Experiment
from ..core import hardware
from ..core.tokens import write_atomic
from ..data import prepare
from ..data.parquet_inputs import inspect_file, resolve_paths
from ..data.size import DataSize, from_manifest, from_parquet
from ..probe.trial import GIB, ProbeJob, usable_bytes
from ..probe.verdict import probe_accumulation
from ..tracking.tracker import Tracker
from . import figures
from .family import PlanError, Target

# A CPU trial times about this long (its steps sized by the predicted speed; 2 to 40 timed steps after the warm-up
# step): a fresh process's first steps run slow, and a shared CPU's speed wanders from second to second
CPU_TRIAL_TIMED_S = 10
CPU_TRIAL_MAX_FLOPS = 1e13  # what a CPU trial may time at all (~10 min at 15 GFLOPS); bigger shapes: scaled figures


CPU_TRIAL_WARMUP_STEPS = 3


def trial_steps(exp: Experiment, gpu: bool) -> int:
    """probe.steps on a GPU; on a CPU, CPU_TRIAL_WARMUP_STEPS and enough steps to time ~CPU_TRIAL_TIMED_S at the
    predicted speed (hardware.tokens_per_s of the candidate's experiment)."""
    if gpu or not exp.hardware.tokens_per_s:
        return exp.probe.steps
    t = exp.train
    per_step = t.batch_size * probe_accumulation(exp, t.batch_size) * exp.model.block_size  # what the trial runs
    timed = max(2, min(40, math.ceil(CPU_TRIAL_TIMED_S * exp.hardware.tokens_per_s / per_step)))
    return CPU_TRIAL_WARMUP_STEPS + timed


def target(exp: Experiment, gpu: str | None, measure: bool) -> tuple[Target, Experiment]:
    """The card (or CPU) to plan for, and the experiment whose hardware section predicts its speed."""
    local = hardware.device_name(hardware.cuda_device()) if torch.cuda.is_available() else None
    name = gpu or exp.hardware.gpu or local or ("cpu" if measure else None)
    if name is None:
        raise PlanError('no card to plan for and no GPU here: pass --gpu NAME (e.g. --gpu "RTX 4070"), or --gpu cpu '
                        "--measure to plan for this CPU")
    margin = exp.probe.margin
    if name.lower() == "cpu":
        if not measure:
            raise PlanError("--gpu cpu needs --measure: no table knows this CPU's speed, so the plan times it")
        memory_gb = exp.probe.gpu_memory_gb or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        rough = hardware.matmul_tflops(torch.device("cpu"))
        return (Target("cpu", "cpu", round(memory_gb, 1), int((1 - margin) * memory_gb * GIB)),
                exp.with_changes("hardware", gpu="cpu", peak_tflops=rough, assumed_mfu=figures.GENERIC_MFU))
    speed_exp = exp.with_changes("hardware", gpu=name)
    if measure:
        if local is None or hardware.normalise_gpu_name(local) != hardware.normalise_gpu_name(name):
            raise PlanError(f"--measure times this machine's {local or 'CPU'}, not a {name}: drop --measure (the plan "
                            f"then takes the card's peak FLOPs x MFU) or run it on that card")
        if figures.throughput(speed_exp, 1.0)[0] is None:  # an unknown card: its matmul speed ranks the shapes
            speed_exp = speed_exp.with_changes("hardware", peak_tflops=hardware.matmul_tflops(hardware.cuda_device()))
    elif figures.throughput(speed_exp, 1.0)[0] is None:
        raise PlanError(f"no peak-FLOPs figure for GPU {name!r}: set hardware.peak_tflops=<its dense bf16 TFLOPS>, "
                        f"or run with --measure on that card")
    memory_gb = exp.probe.gpu_memory_gb or hardware.table_memory(name)
    if memory_gb is None and measure:
        memory_gb = torch.cuda.get_device_properties(hardware.cuda_device()).total_memory / GIB
    if memory_gb is None:
        raise PlanError(f"how much memory has a {name}? set probe.gpu_memory_gb (e.g. probe.gpu_memory_gb=16)")
    usable = usable_bytes(exp.with_changes("probe", gpu_memory_gb=memory_gb))  # less the card's context overhead
    return Target(name, "cuda", memory_gb, int((1 - margin) * usable)), speed_exp


ESTIMATES = Path(".fwray/plan/memory_estimates.json")


def cached_estimates(path: Path = ESTIMATES):
    """fwray.plan.family.peak_bytes, remembered on disk: a 124M estimate costs seconds, and a plan asks for ~20. The
    key is everything the estimate reads (model, train section, micro-batch, device, workers) and the versions."""

    from .. import __version__
    from .family import peak_bytes

    known = json.loads(path.read_text()) if path.is_file() else {}

    def estimate(exp: Experiment, device_type: str, batch_size: int) -> int:
        key = json.dumps([__version__, torch.__version__, asdict(exp.model), asdict(exp.train), batch_size,
                          device_type, exp.resources.num_workers], sort_keys=True, default=str)
        if key not in known:
            known[key] = peak_bytes(exp, device_type, batch_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(known).encode())
        return known[key]

    return estimate


def data_size(exp: Experiment) -> DataSize:
    """The prepared cache's counts when there is one, else the parquet's (fwray.data.size)."""
    files = [inspect_file(p, exp.data) for p in resolve_paths(exp.data.paths)]
    hit = prepare.cached(exp.data, files)
    size = from_manifest(hit[1], str(hit[0])) if hit else from_parquet(files, exp.data)
    if size.train_tokens <= 0:
        raise PlanError(f"{files[0].path}: no training tokens (every row empty or filtered out); check "
                        f"data.text_column and the filters")
    return size


def measurer(exp: Experiment, target: Target, out_dir: Path):
    """What --measure times with: the probe's trials (Ray Tune, one fresh process each) of the given experiments on
    this machine's device, as (tokens/s of the run, seconds of one evaluation with its checkpoint) or None."""
    rounds = []

    def measure(exps: list[Experiment]) -> list[dict | None]:
        import ray  # the cluster's CPUs, as a training worker gets them

        from .. import ray_session
        from ..probe import sweep as probe  # Ray Tune: the probe's sweep, a fresh process per trial

        ray_session.start()
        gpu = target.device_type == "cuda" and ray_session.use_gpu(exp.resources.use_gpu)
        workers = exp.resources.num_workers
        cpus = 1 if gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // workers)
        jobs = [ProbeJob(e.with_changes("probe", gpu_memory_gb=target.memory_gb, steps=trial_steps(e, gpu)), (), (),
                         gpu, cpu_timing_max_flops=CPU_TRIAL_MAX_FLOPS, time_evaluation=True,
                         warmup_steps=1 if gpu else CPU_TRIAL_WARMUP_STEPS) for e in exps]
        trials = [{"job": i, "batch_size": e.train.batch_size, "activation_checkpointing": False, "compile": None}
                  for i, e in enumerate(exps)]
        rounds.append(len(exps))
        print(f"measure: timing depth {', '.join(str(e.model.n_layer) for e in exps)} on "
              f"{'the GPU' if gpu else f'{cpus} CPUs'} (the probe's trials, one fresh process each)", flush=True)
        results = probe.sweep(jobs, trials, out_dir / f"measure-{len(rounds)}", cpus)
        out = []
        for e, r in zip(exps, results):
            if r["status"] == "oom":
                print(f"measure: depth {e.model.n_layer} does not fit the card ({r['reason']})", flush=True)
                out.append({"oom": r["reason"]})
                continue
            if r["status"] != "ok" or not r.get("tokens_per_s") or "eval_batch_s" not in r:
                print(f"measure: depth {e.model.n_layer} not timed ({r['reason'] or r['status']}): its speed is "
                      f"scaled from the others", flush=True)
                out.append(None)
                continue
            out.append({**{k: r[k] for k in ("eval_batch_s", "checkpoint_s", "samples_s")},
                        "tokens_per_s": r["tokens_per_s"] * workers})
            print(f"measure: depth {e.model.n_layer}: {r['tokens_per_s'] * workers:,.0f} tokens/s; an evaluation "
                  f"batch {r['eval_batch_s']:.2f} s, a checkpoint {r['checkpoint_s']:.2f} s, the samples "
                  f"{r['samples_s']:.1f} s", flush=True)
        return out

    return measure


def track(tracker: Tracker, plan, text: str, out_dir: Path, written: Path | None, command: str) -> str | None:
    """The plan as a top-level run of the tracker's (its outbox in `out_dir`): params, the table (and the written
    experiment) as artifacts. Returns its id, or None when MLflow did not start it (one warning)."""
    from .planner import planned_experiment

    exp, b = plan.exp, plan.best
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan_table.txt").write_text(text + "\n")
    rows = [{**{k: v for k, v in asdict(c).items() if k != "model"}, "n_layer": c.model.n_layer,
             "n_embd": c.model.n_embd, "n_head": c.model.n_head} for c in plan.cands]
    (out_dir / "plan.json").write_text(json.dumps(rows, indent=1, default=str))
    run = tracker.child(f"plan-{out_dir.name}", {"fwray.kind": "plan", "mlflow.note.content": text}, out_dir)
    chosen = planned_experiment(plan)
    pred = figures.predicted_speed(chosen, b.flops_per_token, b.tokens, b.params)
    run.params({
        "command": command, "hours": plan.budget_s / 3600, "gpu": plan.target.name,
        "memory_gb": plan.target.memory_gb, "limit_gb": plan.target.limit_bytes / GIB,
        "train_tokens": plan.data.train_tokens, "data_source": plan.data.source, "speed": plan.speed_note,
        "tokens_per_step": exp.tokens_per_step, "depth": b.depth, "model.n_layer": b.model.n_layer,
        "model.n_embd": b.model.n_embd, "model.n_head": b.model.n_head, "params": b.params,
        "train.batch_size": b.micro_batch, "train.gradient_accumulation_steps": b.accumulation,
        "train.max_iters": b.max_iters, "train.eval_interval": chosen.train.eval_interval, "tokens": b.tokens,
        "epochs": round(b.epochs, 4), "tokens_per_s": round(b.tokens_per_s), "speed_source": b.speed_source,
        "predicted_seconds": round(b.seconds, 1), "slowest_seconds": round(pred.get("slowest_seconds", b.seconds), 1),
        "mfu_band": pred.get("mfu_band", "none"), "law_loss": round(b.law, 4),
        "why": plan.why})
    for path in [out_dir / "plan_table.txt", out_dir / "plan.json"] + ([written] if written else []):
        run.artifact(path)
    run.finish(True)
    return run.run_id
