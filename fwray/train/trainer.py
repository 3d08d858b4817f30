"""Ray Train around the engine: a TorchTrainer whose workers run `engine.train`, checkpointing through Ray.

Checkpoints go through `ray.train.report` at every evaluation; Ray keeps the last `train.keep_checkpoints`, restarts
a killed worker (`resources.max_failures`) and hands it the latest checkpoint through `ray.train.get_checkpoint`.
A rerun with the same Ray run name and storage path continues from that run's checkpoints (`--resume`).
The run's summary comes back to the driver as rank 0's return value (`Result.return_value`), not through a file: on
a cluster the driver cannot see the files a worker writes on its own node.

On object storage (`resources.storage_path: s3://...`) Ray writes the checkpoints there itself; rank 0 writes its
files on its own node (`fwray.storage.uri.local_mirror`) and uploads the final model beside the checkpoints, and each
worker fetches a token cache kept there to its node's disk (`fwray.storage.node_cache`).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .. import ray_session
from ..config import Experiment
from ..core import checkpoint, engine, hardware
from ..core.health import HealthSampler
from ..core.loader import Batches
from ..core.yardstick import Yardstick
from ..data.yardstick import on_this_node
from ..errors import FwrayError, last_line
from ..storage import node_cache
from ..storage import uri as locations
from ..tracking.live import RunLogger, metric_history
from .artifacts import CURVES, EvalArtifacts


class TrainingFailed(FwrayError):
    """The training workers failed for good (Ray's retries spent): the worker's last line says why."""


class TrainingStopped(FwrayError):
    """A worker stopped on a deterministic error (bad data or config, a diverged loss): never retried, since a
    restart would only repeat it. Carries the worker error's message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, picklable: the resolved experiment, its data and where to log."""

    exp: Experiment
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    tracking_uri: str
    run_id: str
    run_dir: str  # this run's folder (final model, unlogged metrics), or its URI on object storage
    val_text: tuple[int, int] | None = None  # validation (text tokens, UTF-8 bytes) for val_bpb: fwray.core.bpb
    yardstick: Yardstick | None = None  # the extra validation set (absolute paths, as the cache's files)
    shard_sha256: dict[str, str] | None = None  # a shard's name -> its sha256: checks a copy from object storage


def fit(job: TrainJob, ray_run_name: str) -> dict:
    """Train on Ray; returns rank 0's summary of the run. Raises TrainingFailed with one line when Ray's retries are
    spent, TrainingStopped when a worker stopped on an fwray error (its message and exit code)."""
    exp = job.exp
    ray_session.start()  # unless the caller has
    use_gpu = ray_session.use_gpu(exp.resources.use_gpu)  # the cluster's GPUs, not the driver's
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=exp.resources.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": _cpus_per_worker(exp)}),
        run_config=RunConfig(
            name=ray_run_name,
            storage_path=locations.absolute(exp.resources.storage_path),
            failure_config=FailureConfig(max_failures=exp.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # fwray prints its own progress lines
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; its last line is the one that says what happened
        raise TrainingFailed(f"training failed: {_innermost_line(e)}") from e
    if result.error is not None:
        raise TrainingFailed(f"training failed: {_innermost_line(result.error)}") from result.error
    # Result.metrics would not do: in Train V2 it is the metrics of the latest report that carried a checkpoint
    summary = result.return_value
    if not isinstance(summary, dict):
        raise TrainingFailed("training failed: rank 0 returned no summary of the run")
    if "stopped" in summary:
        raise TrainingStopped(summary["stopped"]["message"], summary["stopped"]["exit_code"])
    return summary


def _cpus_per_worker(exp: Experiment) -> int:
    """Training on CPUs: share them out. Ray sets a worker's torch threads (OMP_NUM_THREADS) to its CPU count, so
    the default of 1 CPU a worker would train a single worker on one core of many."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // exp.resources.num_workers)


def _innermost_line(e: BaseException) -> str:
    """The last line of the innermost cause's message: what went wrong in the worker, not Ray's wrapping."""
    while e.__cause__ is not None:
        e = e.__cause__
    return last_line(e)


def _worker(config: dict) -> dict | None:
    """One Ray Train worker: the engine's loop, reports and checkpoints; rank 0 returns the run's summary."""
    job: TrainJob = config["job"]
    # Ray Train logs every report at INFO ("Reporting training result N: ..."); fwray prints its own progress lines
    logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    run_dir = locations.local_mirror(job.run_dir)  # on object storage: this node's folder for the run
    logger = RunLogger(job.tracking_uri, job.run_id, run_dir) if rank == 0 else None
    if logger and device.type == "cuda":  # the driver tagged what the cluster offers; this is the card that trains
        logger.tags({"fwray.device": hardware.device_name(device)})
    resume = _latest_state(logger)
    final: dict = {}
    report = _reporter(job, run_dir, rank, device, logger, resume, final)
    try:
        summary = _train(job, rank, world, device, report, resume)
    except FwrayError as e:  # deterministic (data, config, a diverged loss): returned, so Ray does not retry it
        summary = {"stopped": {"message": str(e), "exit_code": e.exit_code}}
    if rank != 0:
        return None
    if "stopped" not in summary:
        model_dir = run_dir / checkpoint.MODEL_DIR  # the last evaluation's state is the end of training
        checkpoint.save_model(model_dir, job.exp, final["state"]["model"], final["step"], final.get("val_loss"))
        logger.artifact(model_dir, checkpoint.MODEL_DIR)
        if locations.is_uri(job.run_dir):  # beside the checkpoints, where another machine finds it
            locations.upload(model_dir, locations.join(job.run_dir, checkpoint.MODEL_DIR))
    return summary  # Ray hands rank 0's return value to the driver: Result.return_value


def _latest_state(logger: RunLogger | None) -> dict | None:
    """The training state of Ray's latest checkpoint (a restarted worker resumes from it), or None on a fresh start."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    with latest.as_directory() as d:
        resume = checkpoint.load_state(d)
    if logger:
        logger.tags({"fwray.resumed_from_step": resume["step"]})
    return resume


def _reporter(job: TrainJob, run_dir: Path, rank: int, device, logger: RunLogger | None, resume: dict | None,
              final: dict):
    """The engine's report callback: on rank 0, metrics (with the machine's figures at each log interval), the progress
    line, the loss curve and samples; on every rank, each checkpoint reported to Ray (rank 0's state kept in `final`).
    """
    exp = job.exp
    evals = health = None
    if logger:  # rank 0: loss curve and samples at each evaluation; a restarted worker rebuilds the history
        history = (metric_history(job.tracking_uri, job.run_id, CURVES, fallback=logger.fallback,
                                  max_step=resume["step"]) if resume else None)
        evals = EvalArtifacts(exp, run_dir, logger, history)
        health = HealthSampler(device)  # rank 0's node: the machine its GPU (or CPU) is in

    def report(step: int, metrics: dict, state: dict | None) -> None:
        if logger:
            if "train_loss" in metrics:  # a log interval: the machine's figures at the loss's step
                metrics = {**metrics, **health.sample()}
            logger.metrics(step, metrics)
            print(progress_line(step, exp.train.max_iters, metrics), flush=True)
            evals.record(step, metrics)
            if "val_loss" in metrics:
                evals.on_eval(step, state["model"] if state is not None else None)
        if state is None:
            return
        final.update(metrics, step=step, state=state)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:  # one copy of the state; every rank still reports so Ray can pair them
                checkpoint.save_state(tmp, state, exp)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report({"step": step, **metrics}, checkpoint=ckpt)

    return report


def _train(job: TrainJob, rank: int, world: int, device, report, resume: dict | None) -> dict:
    """This rank's share of the batches (and the yardstick's), through the engine's loop; its summary."""
    exp = job.exp
    train_files, val_files = (node_cache.local_files(files, job.shard_sha256, exp.data.node_cache_dir)
                              for files in (job.train_files, job.val_files))
    batches = Batches.from_files(train_files, val_files, exp.model.block_size,
                                 batch_size=exp.train.batch_size, eval_batch_size=exp.train.eval_batch_size,
                                 seed=exp.train.seed, rank=rank, world_size=world, sampling=exp.data.sampling,
                                 align_to_documents=exp.data.align_to_documents,
                                 accumulation=exp.train.gradient_accumulation_steps)
    yardstick = (on_this_node(job.yardstick, exp.data.node_cache_dir).open(
        exp.model.block_size, exp.train.eval_batch_size or exp.train.batch_size) if job.yardstick else None)
    return engine.train(exp.model, exp.train, batches, report, device=device, resume=resume, world_size=world,
                        peak_tflops=exp.hardware.peak_tflops, val_text=job.val_text, yardstick=yardstick)


def progress_line(step: int, max_iters: int, m: dict) -> str:
    parts = [f"step {step:>{len(str(max_iters))}}/{max_iters}"]
    if "val_loss" in m:
        parts.append(f"val loss {m['val_loss']:.4f}")
        if "val_bpb" in m:
            parts.append(f"bpb {m['val_bpb']:.4f}")
        if "yardstick_val_loss" in m:
            parts.append(f"yardstick {m['yardstick_val_loss']:.4f}")
        return " | ".join(parts)
    parts += [f"loss {m['train_loss']:.4f}", f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "peak_alloc_gb" in m:
        parts.append(f"mem {m['peak_alloc_gb']:.2f}/{m['peak_reserved_gb']:.2f} GB alloc/reserved")
    parts += [f"epoch {m['epoch']:.3f}", f"ETA {m['eta_s'] / 60:.1f} min"]
    if m.get("nonfinite_skipped"):
        parts.append(f"{m['nonfinite_skipped']} non-finite steps skipped")
    return " | ".join(parts)
