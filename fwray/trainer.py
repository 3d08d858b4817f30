"""Ray Train around the engine: a TorchTrainer whose workers run `engine.train`, checkpointing through Ray.

Checkpoints go through `ray.train.report` at every evaluation; Ray keeps the last `train.keep_checkpoints`, restarts
a killed worker (`resources.max_failures`) and hands it the latest checkpoint through `ray.train.get_checkpoint`.
A rerun with the same Ray run name and storage path continues from that run's checkpoints (`--resume`).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import engine, hardware, ray_session, tokens
from .config import Experiment
from .engine import NonFiniteLoss
from .loader import Batches
from .sample import MODEL_CONFIG, MODEL_FILE, STATE_FILE  # the files fwray.sample reads
from .artifacts import EvalArtifacts
from .tracking import RunLogger, metric_history

SUMMARY_FILE = "summary.json"  # rank 0's summary of the finished run, read by the driver


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, picklable: the resolved experiment, its data and where to log."""

    exp: Experiment
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    train_tokens: int
    tracking_uri: str
    run_id: str
    run_dir: str  # local folder of this run: final model, unlogged metrics


def fit(job: TrainJob, ray_run_name: str) -> dict:
    """Train on Ray; returns the final metrics rank 0 reported. Raises RuntimeError with one line on failure."""
    exp = job.exp
    ray_session.start()  # unless the caller has
    use_gpu = hardware.pick_device(exp.resources.use_gpu).type == "cuda"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=exp.resources.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": _cpus_per_worker(exp)}),
        run_config=RunConfig(
            name=ray_run_name,
            storage_path=str(Path(exp.resources.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=exp.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # fwray prints its own progress lines
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; its last line is the one that says what happened
        raise RuntimeError(f"training failed: {_last_line(e)}") from e
    if result.error is not None:
        raise RuntimeError(f"training failed: {_last_line(result.error)}") from result.error
    summary = json.loads((Path(job.run_dir) / SUMMARY_FILE).read_text())
    if "stopped" in summary:
        raise NonFiniteLoss(summary["stopped"])
    return summary


def _cpus_per_worker(exp: Experiment) -> int:
    """Training on CPUs: share them out. Ray sets a worker's torch threads (OMP_NUM_THREADS) to its CPU count, so
    the default of 1 CPU a worker would train a single worker on one core of many."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // exp.resources.num_workers)


def _last_line(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def _worker(config: dict) -> None:
    job: TrainJob = config["job"]
    exp = job.exp
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logger = RunLogger(job.tracking_uri, job.run_id, job.run_dir) if rank == 0 else None

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(d)
        if logger:
            logger.tags({"fwray.resumed_from_step": resume["step"]})
    evals = None  # rank 0: loss curve and samples at each evaluation; a restarted worker rebuilds the history
    if logger:
        history = (metric_history(job.tracking_uri, job.run_id, fallback=logger.fallback, max_step=resume["step"])
                   if resume else None)
        evals = EvalArtifacts(exp, job.run_dir, logger, history)

    batches = Batches.from_files(job.train_files, job.val_files, exp.model.block_size,
                                 batch_size=exp.train.batch_size, eval_batch_size=exp.train.eval_batch_size,
                                 seed=exp.train.seed, rank=rank, world_size=world)
    final: dict = {}

    def report(step: int, metrics: dict, state: dict | None) -> None:
        if logger:
            logger.metrics(step, metrics)
            print(progress_line(step, exp.train.max_iters, metrics), flush=True)
            evals.record(step, metrics)
            if "val_loss" in metrics:
                evals.on_eval(step, state["model"] if state is not None else None)
        if state is None:
            return
        final.update(metrics, step=step, state=state)
        state["mlflow_run_id"] = job.run_id
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:  # one copy of the state; every rank still reports so Ray can pair them
                torch.save(state, Path(tmp) / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report({"step": step, **metrics}, checkpoint=ckpt)

    try:
        summary = engine.train(exp, batches, report, device=device, train_tokens=job.train_tokens, resume=resume,
                               world_size=world)
    except NonFiniteLoss as e:  # a verdict on the run, not a crash: restarting would only repeat it
        summary = {"stopped": str(e)}
    if rank == 0:
        if "stopped" not in summary:
            _save_final_model(exp, final, Path(job.run_dir) / "model")
            logger.artifact(Path(job.run_dir) / "model", "model")
        tokens.write_atomic(Path(job.run_dir) / SUMMARY_FILE, json.dumps(summary).encode())


def progress_line(step: int, max_iters: int, m: dict) -> str:
    parts = [f"step {step:>{len(str(max_iters))}}/{max_iters}"]
    if "val_loss" in m:
        return " | ".join(parts + [f"val loss {m['val_loss']:.4f}"])
    parts += [f"loss {m['train_loss']:.4f}", f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "peak_alloc_gb" in m:
        parts.append(f"mem {m['peak_alloc_gb']:.2f}/{m['peak_reserved_gb']:.2f} GB alloc/reserved")
    parts += [f"epoch {m['epoch']:.3f}", f"ETA {m['eta_s'] / 60:.1f} min"]
    if m.get("nonfinite_skipped"):
        parts.append(f"{m['nonfinite_skipped']} non-finite steps skipped")
    return " | ".join(parts)


def _save_final_model(exp: Experiment, final: dict, folder: Path) -> None:
    """Weights (loadable with weights_only=True) and the model config: enough to rebuild without the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    state = final["state"]  # the last evaluation's state is the end of training
    buf = io.BytesIO()
    torch.save(state["model"], buf)
    tokens.write_atomic(folder / MODEL_FILE, buf.getvalue())
    model_config = {**vars(engine.gpt_config(exp)), "tokenizer": exp.data.tokenizer, "eot": tokens.EOT,
                    "step": state["step"], "val_loss": final.get("val_loss")}
    tokens.write_atomic(folder / MODEL_CONFIG, json.dumps(model_config, indent=2).encode())
