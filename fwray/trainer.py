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

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import engine, hardware, tokens
from .config import Experiment
from .engine import NonFiniteLoss
from .loader import Batches
from .tracking import RunLogger

STATE_FILE = "state.pt"


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
    use_gpu = hardware.pick_device(exp.resources.use_gpu).type == "cuda"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=exp.resources.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=ray_run_name,
            storage_path=str(Path(exp.resources.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=exp.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; its last line is the one that says what happened
        raise RuntimeError(f"training failed: {_last_line(e)}") from e
    metrics = dict(result.metrics or {})
    if metrics.get("stopped"):
        raise NonFiniteLoss(metrics["stopped"])
    return metrics


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

    batches = Batches.from_files(job.train_files, job.val_files, exp.model.block_size,
                                 batch_size=exp.train.batch_size, eval_batch_size=exp.train.eval_batch_size,
                                 seed=exp.train.seed, rank=rank)
    final: dict = {}

    def report(step: int, metrics: dict, state: dict | None) -> None:
        if logger:
            logger.metrics(step, metrics)
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
        ray.train.report({"stopped": str(e)})
        return
    if rank == 0:
        _save_final_model(exp, final, Path(job.run_dir) / "model")
        logger.artifact(Path(job.run_dir) / "model", "model")
        logger.metrics(exp.train.max_iters, {"final_val_loss": summary["final_val_loss"]})
    ray.train.report({"done": 1, "final_val_loss": summary["final_val_loss"],
                      "first_val_loss": summary["first_val_loss"], "params": summary["params"],
                      "tokens_per_s_mean": summary["tokens_per_s"] or 0.0, "step": exp.train.max_iters})


def _save_final_model(exp: Experiment, final: dict, folder: Path) -> None:
    """Weights (loadable with weights_only=True) and the model config: enough to rebuild without the YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    state = final["state"]  # the last evaluation's state is the end of training
    buf = io.BytesIO()
    torch.save(state["model"], buf)
    tokens.write_atomic(folder / "model.pt", buf.getvalue())
    model_config = {**vars(engine.gpt_config(exp)), "tokenizer": exp.data.tokenizer, "eot": tokens.EOT,
                    "step": state["step"], "val_loss": final.get("val_loss")}
    tokens.write_atomic(folder / "model_config.json", json.dumps(model_config, indent=2).encode())
