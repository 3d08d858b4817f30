"""One experiment's figures, pure: parameters, tokens per step, epochs, predicted speed and time, shown before training
and logged; and after the run, what it measured beside what was predicted."""
from __future__ import annotations

import torch

from . import hardware
from .config import Experiment
from .model import count_params, flops_per_token


def figures(exp: Experiment, manifest: dict) -> dict[str, float]:
    """Parameters, tokens per step, total tokens, epochs and the split sizes of a resolved experiment."""
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    params = count_params(exp.model)
    fpt = flops_per_token(exp.model, params)
    total = exp.train.max_iters * exp.tokens_per_step
    return {
        "params": params,
        "tokens_per_step": exp.tokens_per_step,
        "max_iters": exp.train.max_iters,
        "total_train_tokens": total,
        "epochs": total / train["tokens"],
        "train_documents": train["documents"], "train_tokens": train["tokens"],
        "val_documents": val["documents"], "val_tokens": val["tokens"],
        "flops_per_token": fpt,
        "total_flops": fpt * total,
        **predicted_speed(exp, fpt, total),
    }


def predicted_speed(exp: Experiment, flops_per_tok: float, total_tokens: int) -> dict[str, float]:
    """tokens/s and hours on the target GPU at hardware.assumed_mfu; nothing where the peak is unknown."""
    gpu = exp.hardware.gpu or (hardware.device_name(torch.device("cuda")) if torch.cuda.is_available() else None)
    peak = exp.hardware.peak_tflops or (hardware.table_peak(gpu) if gpu else None)
    if not peak:
        return {}
    tok_s = exp.hardware.assumed_mfu * peak * 1e12 / flops_per_tok * exp.resources.num_workers
    return {"predicted_tokens_per_s": tok_s, "predicted_hours": total_tokens / tok_s / 3600}


def describe(exp: Experiment, fig: dict[str, float]) -> str:
    t = exp.train
    return "\n".join([
        f"plan for {exp.name!r} ({exp.source})",
        f"  model        {exp.model.n_layer} layers x {exp.model.n_embd} wide, {exp.model.n_head} heads, "
        f"block {exp.model.block_size}: {fig['params']:,} parameters ({fig['params'] / 1e6:.1f}M)",
        f"  step         {t.batch_size} x {exp.model.block_size} tokens x {t.gradient_accumulation_steps} accumulation"
        f" x {exp.resources.num_workers} worker(s) = {fig['tokens_per_step']:,} tokens per optimizer step",
        f"  budget       {fig['max_iters']:,} steps = {fig['total_train_tokens']:,} tokens "
        f"= {fig['epochs']:.2f} epochs over the train split ({fig['total_flops']:.3g} FLOPs)",
        f"  data         train {fig['train_documents']:,} documents / {fig['train_tokens']:,} tokens; "
        f"val {fig['val_documents']:,} documents / {fig['val_tokens']:,} tokens",
        "  time         " + (f"~{fig['predicted_hours']:.1f} h at {fig['predicted_tokens_per_s']:,.0f} tokens/s "
                              f"({exp.hardware.gpu or 'this GPU'} at an assumed {100 * exp.hardware.assumed_mfu:.0f}% "
                              f"MFU; the run logs the measured figure)" if "predicted_hours" in fig else
                              "no prediction: no known GPU (set hardware.gpu, e.g. \"RTX 4070\", or "
                              "hardware.peak_tflops)"),
    ])


def outcome(fig: dict[str, float], summary: dict, predicted_peak_gb: float | None = None) -> dict[str, float]:
    """What the run measured beside what the plan (and the probe) predicted."""
    out = {"measured_tokens_per_s": summary.get("tokens_per_s"), "measured_hours": summary.get("seconds", 0) / 3600,
           "predicted_tokens_per_s": fig.get("predicted_tokens_per_s"), "predicted_peak_gb": predicted_peak_gb,
           "measured_peak_gb": summary.get("peak_reserved_gb")}
    return {k: v for k, v in out.items() if v is not None}


def describe_outcome(out: dict[str, float]) -> str:
    lines = []
    measured = out.get("measured_tokens_per_s")
    if measured:
        line = f"  speed        measured {measured:,.0f} tokens/s"
        if out.get("predicted_tokens_per_s"):
            line += (f" vs {out['predicted_tokens_per_s']:,.0f} predicted "
                     f"({measured / out['predicted_tokens_per_s']:.2f}x the plan)")
        lines.append(line)
    if out.get("measured_peak_gb") is not None:
        line = f"  memory       peak {out['measured_peak_gb']:.2f} GB reserved"
        if out.get("predicted_peak_gb"):
            line += f" vs {out['predicted_peak_gb']:.2f} GB the probe measured or predicted"
        lines.append(line)
    return "\n".join(["measured against the plan"] + lines) if lines else ""
