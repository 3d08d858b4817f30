"""The training loop: optimizer, schedule, train step, evaluation. Pure torch: no ray or mlflow here.

`train(model_config, train_config, batches, report, ...)` runs the loop and hands metrics and checkpoint states to `report`; the caller
(Ray Train in fwray.train.trainer, or a plain script) decides where they go.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

import torch
import torch.distributed as dist

from ..config import ModelConfig, TrainConfig, tokens_per_step
from ..errors import FwrayError
from . import bpb, hardware
from .loader import Batches
from .model import GPT, flops_per_token
from .optim import Optimizers, lr_multiplier, make_optimizer, muon_momentum
from .tokens import EOT
from .yardstick import YardstickBatches


class NonFiniteLoss(FwrayError):
    """Too many non-finite losses in a row: the run stops, its last good checkpoint kept."""


Report = Callable[[int, dict, "dict | None"], None]  # (step, metrics, checkpoint state or None)


class ValLoss(NamedTuple):
    """Validation losses, nats per target."""

    loss: float  # over every target: val_loss
    text_loss: float  # over the targets that are text (EOT left out): what bits per byte converts (fwray.core.bpb)
    targets: int  # how many targets were read

    @classmethod
    def of(cls, sums: torch.Tensor) -> "ValLoss":
        nats, targets, text_nats, text_targets = sums.tolist()  # the one read-back of an evaluation
        return cls(nats / targets, text_nats / text_targets if text_targets else float("nan"), int(targets))


@torch.no_grad()
def loss_sums(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              to_device: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """[nats, targets, text nats, text targets] summed over the batches, in float64 on the model's device: batches
    and ranks add up without a sync. Every target counts in val_loss; the text targets (EOT left out) in bpb."""
    device = next(model.parameters()).device
    to_device = to_device or (lambda t: t.to(device))
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = to_device(x), to_device(y)
        losses = model.token_losses(x, y).flatten().double()
        text = (y.flatten() != EOT).double()
        total += torch.stack([losses.sum(), text.new_tensor(float(y.numel())), (losses * text).sum(), text.sum()])
    return total


def autocast_dtype(train: TrainConfig, device_type: str) -> torch.dtype:
    """train.dtype on a device type: auto means bf16 autocast on CUDA, float32 elsewhere."""
    if train.dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, train.dtype)


def autocast_context(device_type: str, dtype: torch.dtype):
    """Autocast to `dtype` (bf16 on CUDA), or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def compile_enabled(train: TrainConfig, device: torch.device) -> bool:
    """train.compile resolved: true compiles on any device, auto on CUDA only (on a CPU, Inductor's C++ compile costs
    more than it saves, and the check below would cost a compile too); either way only where torch.compile can run
    (hardware.compile_available), else one warning saying what is missing, and training runs uncompiled."""
    if train.compile is False or (train.compile == "auto" and device.type != "cuda"):
        return False
    available, why = hardware.compile_available(device)
    if not available:
        warnings.warn(f"{why}; training runs uncompiled", stacklevel=2)
    return available


@dataclass
class Engine:
    """One worker's model, optimizer and step; built by `Engine.build` from the model and train sections."""

    model_config: ModelConfig
    train: TrainConfig
    device: torch.device
    raw_model: GPT  # uncompiled, unwrapped: what checkpoints hold
    model: torch.nn.Module  # what runs: maybe compiled, then maybe DDP-wrapped
    optimizer: Optimizers
    dtype: torch.dtype
    compiled: bool

    @classmethod
    def build(cls, model_config: ModelConfig, train: TrainConfig, device: torch.device,
              activation_checkpointing: bool | None = None, compile: bool | None = None) -> "Engine":
        torch.manual_seed(train.seed)  # identical initial weights on every worker and every restart
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ac = train.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
        raw = GPT(model_config, loss_chunk_size=train.loss_chunk_size, activation_checkpointing=ac).to(device)
        model: torch.nn.Module = raw
        compiled = compile_enabled(train, device) if compile is None else compile
        if compiled:
            model = torch.compile(model)
        if _world_size() > 1:
            # DDP outermost (as nanoGPT): torch.compile(DDP(m)) is no DDP instance, and `step` must reach DDP's
            # no_sync to skip the all-reduce on all but the last micro-step. Gradients as views of the all-reduce
            # buckets: no second copy of them, so a worker's peak is what the single-process probe measured. DDP
            # aliases only a gradient that exists (at construction, or at an all-reduce) and no_sync micro-steps
            # accumulate into .grad, so a gradient set to None comes back as a full-size tensor beside the buckets:
            # gradients exist from the start and `step` zeroes them in place, never drops them.
            for p in raw.parameters():
                p.grad = torch.zeros_like(p)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        return cls(model_config, train, device, raw, model, make_optimizer(raw, train),
                   autocast_dtype(train, device.type), compiled)

    def autocast(self):
        return autocast_context(self.device.type, self.dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def step(self, step: int, get_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> tuple[
            torch.Tensor, torch.Tensor]:
        """One optimizer step over gradient_accumulation_steps micro-batches, with no host sync (both optimizers skip
        a non-finite step on the device, see Optimizers.step).

        Returns (mean loss, non-finite flag) as device tensors. A non-finite step is skipped: weights and optimizer
        state stay as they were.
        """
        t = self.train
        accum = t.gradient_accumulation_steps
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        for micro in range(accum):
            x, y = (self.to_device(a) for a in get_batch(micro))
            sync = micro == accum - 1 or not ddp
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
                loss = self.model(x, y) / accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), t.grad_clip) if t.grad_clip > 0
                     else torch.zeros((), device=self.device))
        bad = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
        if _world_size() > 1:  # each rank saw its own loss: skip the step on every rank if any saw a bad one
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.optimizer.step(lr_multiplier(step, t), found_inf=bad, muon_momentum=muon_momentum(step, t))
        self.optimizer.zero_grad(set_to_none=not ddp)  # under DDP they stay the buckets' views (see build)
        return loss_sum, bad.bool()

    @torch.no_grad()
    def evaluate(self, get_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], iters: int) -> ValLoss:
        """Mean losses over validation batches 0..iters-1, shared out between the ranks: the same figures for any
        number of workers."""
        self.model.eval()
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        with self.autocast():  # raw: eval shapes would recompile the compiled model
            total = loss_sums(self.raw_model, (get_batch(i) for i in range(rank, iters, world)), self.to_device)
        if distributed:
            dist.all_reduce(total)
        self.model.train()
        return ValLoss.of(total)

    def state(self, step: int, extra: dict) -> dict:
        """A checkpoint: uncompiled weights, optimizer, the step reached (batches derive from it), the random
        generators (dropout draws from them). Tensors stay on the device (fwray.core.checkpoint saves CPU copies)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                "rng": rng, **extra}

    def load(self, state: dict) -> int:
        # a plain dict drops the state dict's `_metadata`: a `load_state_dict(..., assign=True)` elsewhere marks it
        # "assign", which would replace the (tied) parameters the optimizer holds instead of copying into them
        saved, built = set(state["model"]), set(self.raw_model.state_dict())
        if saved != built:  # one line, not load_state_dict's list of every key
            extra, lacking = sorted(saved - built)[:2], sorted(built - saved)[:2]
            raise FwrayError(f"the checkpoint's model does not fit this run's (it has {extra or 'nothing more'}, "
                             f"lacks {lacking or 'nothing'}): resume with the model section it was saved with (one "
                             "saved before model.unet_skips and model.value_embeds existed has them off: "
                             "model.unet_skips=false)")
        self.raw_model.load_state_dict(dict(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        rng = state.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return int(state["step"])


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def train(model_config: ModelConfig, train_config: TrainConfig, batches: Batches, report: Report, *,
          device: torch.device, resume: dict | None = None, world_size: int = 1,
          engine: Engine | None = None, peak_tflops: float | None = None,
          val_text: tuple[int, int] | None = None, yardstick: YardstickBatches | None = None) -> dict:
    """Run train_config.max_iters optimizer steps (resolved: not None); returns a summary of the run.
    `world_size` workers each run this loop; `peak_tflops` overrides the peak-FLOPs table for MFU; `val_text`, the
    validation split's (text tokens, UTF-8 bytes) (fwray.core.bpb.text_counts), adds val_bpb to every evaluation;
    `yardstick` (fwray.core.yardstick) adds yardstick_val_loss: the loss on its windows, shared out between the ranks.

    Evaluation (and a checkpoint) happens every eval_interval steps and after the last step; metrics every
    log_interval steps. Only log steps and evaluations read values back from the device.
    """
    t = train_config
    engine = engine or Engine.build(model_config, t, device)
    start = engine.load(resume) if resume else 0
    carried = (resume or {}).get("counters", {})
    nonfinite_total = int(carried.get("nonfinite_skipped", 0))
    step_tokens = tokens_per_step(model_config, t, world_size)
    n_params = engine.raw_model.num_params()
    fpt = flops_per_token(model_config, n_params)
    peak = hardware.peak_tflops(device, peak_tflops)
    summary = {"params": n_params, "first_val_loss": None, "final_val_loss": None, "resumed_from": start}

    loss_acc = torch.zeros((), device=device)
    bad_acc = torch.zeros((), device=device)
    streak = torch.zeros((), device=device)  # current run of non-finite steps
    worst_streak = torch.zeros((), device=device)
    interval_start, interval_steps, run_start = time.perf_counter(), 0, time.perf_counter()
    steps_timed, seconds_timed = 0, 0.0

    for step in range(start, t.max_iters + 1):
        last = step == t.max_iters
        if step % t.eval_interval == 0 or last:
            eval_start = time.perf_counter()
            val = engine.evaluate(batches.val_batch, t.eval_iters)
            summary["first_val_loss"] = summary["first_val_loss"] or val.loss
            summary["final_val_loss"] = val.loss
            ckpt = None
            if step > start or last:
                ckpt = engine.state(step, {"counters": {"nonfinite_skipped": nonfinite_total}})
            metrics = {"val_loss": val.loss, "tokens_seen": step * step_tokens}
            if val_text:
                metrics["val_bpb"] = bpb.bits_per_byte(val.text_loss, *val_text)
            if yardstick is not None:
                metrics["yardstick_val_loss"] = engine.evaluate(yardstick.batch, yardstick.num_batches).loss
                summary["final_yardstick_val_loss"] = metrics["yardstick_val_loss"]
            report(step, metrics, ckpt)
            interval_start += time.perf_counter() - eval_start  # evaluation is not training throughput
        if last:
            break
        loss, bad = engine.step(step, lambda micro, s=step: batches.train_batch(s, micro))
        loss_acc += torch.where(bad, 0.0, loss)
        bad_acc += bad
        streak = (streak + 1) * bad
        worst_streak = torch.maximum(worst_streak, streak)
        interval_steps += 1

        done = step + 1
        if done % t.log_interval == 0 or done == t.max_iters:
            n_bad, worst = int(bad_acc.item()), int(worst_streak.item())  # the one sync of the interval
            nonfinite_total += n_bad
            if worst >= t.max_nonfinite_steps:
                raise NonFiniteLoss(
                    f"{worst} non-finite losses in a row by step {done} (train.max_nonfinite_steps = "
                    f"{t.max_nonfinite_steps}): stopping; the last good checkpoint is kept. Lower "
                    f"train.learning_rate or raise warmup_iters, then resume with --resume")
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - interval_start
            good = interval_steps - n_bad
            tok_s = interval_steps * step_tokens / elapsed
            if step >= start + t.log_interval:  # the first interval carries compilation and warm-up
                steps_timed, seconds_timed = steps_timed + interval_steps, seconds_timed + elapsed
            metrics = {"train_loss": loss_acc.item() / good if good else float("nan"),
                       "lr": t.learning_rate * lr_multiplier(step, t),  # adamw: every group's; muon: the scalars'
                       "tokens_per_s": tok_s, "tokens_seen": done * step_tokens,
                       "epoch": batches.epochs_read(done * step_tokens // model_config.block_size),
                       "nonfinite_skipped": nonfinite_total,
                       "eta_s": (t.max_iters - done) * elapsed / interval_steps,
                       **hardware.memory_stats(device)}
            utilisation = hardware.mfu(tok_s / world_size, fpt, peak)
            if utilisation is not None:
                metrics["mfu"] = utilisation
            report(done, metrics, None)
            loss_acc.zero_(), bad_acc.zero_(), worst_streak.zero_()
            interval_start, interval_steps = time.perf_counter(), 0

    summary.update(steps=t.max_iters, nonfinite_skipped=nonfinite_total, device=hardware.device_name(device),
                   seconds=time.perf_counter() - run_start,
                   tokens_per_s=steps_timed * step_tokens / seconds_timed if seconds_timed else None,
                   **hardware.memory_stats(device))
    return summary
