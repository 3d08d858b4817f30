"""One experiment's figures, pure: parameters, tokens per step, epochs, predicted speed and time, shown before training
and logged; and after the run, what it measured beside what was predicted."""
from __future__ import annotations

import re

import torch

from ..config import Experiment, TrainConfig
from ..core import hardware
from ..core.model import count_params, flops_per_token


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
        **predicted_speed(exp, fpt, total, params),
    }


# Where fwray knows no MFU band (this CPU, with fwray.plan's rough matmul speed): a guess. Plan with --measure, or
# set hardware.assumed_mfu, for a better figure.
GENERIC_MFU = 0.40
# The MFU band a predicted time spans until fwray.plan --measure has timed the shape on the card: fractions of the
# table's dense bf16 peak (fwray.core.hardware), by card class. The plan schedules its steps at the top; the time it shows
# runs to the bottom.
MFU_BANDS: dict[str, tuple[float, float]] = {
    # GeForce cards run matmuls at or above their datasheet rate. Top: a user's nanoGPT log of GPT-2 124M on an
    # RTX 4070, compiled, bf16: 9.35 s per 524,288-token step = 56K tokens/s = 82% of 58.3 TFLOPS. Bottom: what that
    # run does not show (narrower shapes, the modern recipe's Muon and norms, fwray's own loop) may cost a quarter.
    "consumer": (0.60, 0.82),
    # Datacenter and workstation cards reach ~80% of their datasheet on large bf16 matmuls (an H100/H200 ~0.8 of its
    # 989 TFLOPS); a training step less: nanochat logs ~74% on an A100 SXM4 (karpathy/nanochat#147), a 7B model 46%
    # on H100s (foundation-model-stack/fms-fsdp#89).
    "datacenter": (0.40, 0.70),
}
_GEFORCE = re.compile(r"rtx [2-5]0[5-9]0\b")  # RTX 2050 ... 5090, with or without Ti / Super / D / Laptop

# What one evaluation costs besides its forward passes, where fwray.plan --measure has not timed it: the checkpoint
# (fp32 weights and AdamW's two moments, 12 bytes a parameter) is serialised, fsynced, then copied into Ray's
# storage, ~0.5 GB/s end to end on a local SSD; the samples (144 tokens generated), the loss curve and their MLflow
# records ~2 s with a GPU (on a CPU the samples alone take 5-20 s: fwray.plan --measure times them).
CHECKPOINT_BYTES_PER_S = 0.5e9
EVAL_FIXED_S = 2.0
FORWARD_SPEEDUP = 3  # a forward pass costs about 1/3 of forward + backward (2N of 6N FLOPs a token)


def card_class(gpu: str) -> str:
    """The MFU band a card predicts with: 'consumer' for GeForce cards, 'datacenter' for the rest."""
    return "consumer" if _GEFORCE.match(hardware.normalise_gpu_name(gpu)) else "datacenter"


def target_gpu(exp: Experiment) -> str | None:
    """The card the figures are for: hardware.gpu, else the GPU torch sees here, else None."""
    if exp.hardware.gpu:
        return exp.hardware.gpu
    return hardware.device_name(torch.device("cuda")) if torch.cuda.is_available() else None


def mfu_band(exp: Experiment) -> tuple[float, float] | None:
    """The MFU band the prediction spans; None where it is one figure: measured (hardware.tokens_per_s_measured),
    stated (hardware.assumed_mfu), or this CPU's rough one."""
    gpu = target_gpu(exp)
    if exp.hardware.tokens_per_s_measured or exp.hardware.assumed_mfu is not None or not gpu or gpu == "cpu":
        return None
    return MFU_BANDS[card_class(gpu)]


def _band(low: float, high: float) -> str:
    return f"{100 * low:.0f}–{high:.0%}" if low != high else f"{high:.0%}"


def throughput(exp: Experiment, flops_per_tok: float) -> tuple[float | None, str]:
    """Training tokens/s of the run (all workers) on the target, the figure the plan schedules with, and where it
    comes from: hardware.tokens_per_s (what fwray.plan planned with), else the card's dense bf16 peak x MFU (the top
    of its band, or hardware.assumed_mfu) / FLOPs per token; None where the peak is unknown."""
    h = exp.hardware
    band = mfu_band(exp)
    if h.tokens_per_s:
        return h.tokens_per_s, ("hardware.tokens_per_s, measured by fwray.plan --measure" if h.tokens_per_s_measured
                                else "hardware.tokens_per_s, fwray.plan's figure" + (
                                    f" at the top of the {_band(*band)} MFU band" if band else ""))
    gpu = target_gpu(exp)
    peak = h.peak_tflops or (hardware.table_peak(gpu) if gpu else None)
    if not peak:
        return None, (f"no peak-FLOPs figure for {gpu!r}" if gpu else "no GPU named") + (
            " (set hardware.gpu, e.g. \"RTX 4070\", or hardware.peak_tflops)")
    if band:
        mfu, source = band[1], f"{_band(*band)} MFU, the band for {card_class(gpu)} cards in fwray.plan.figures.MFU_BANDS"
    else:
        mfu = h.assumed_mfu if h.assumed_mfu is not None else GENERIC_MFU
        source = f"{mfu:.0%} MFU (" + ("hardware.assumed_mfu)" if h.assumed_mfu is not None else "a guess)")
    tok_s = mfu * peak * 1e12 / flops_per_tok * exp.resources.num_workers
    return tok_s, f"{gpu or 'this GPU'}: {peak:.3g} TFLOPS x {source}"


def evaluations(train: TrainConfig) -> int:
    """Evaluations (each with a checkpoint) in a run of train.max_iters steps: at step 0, every eval_interval steps,
    and after the last step (engine.train)."""
    return train.max_iters // train.eval_interval + 1 + (train.max_iters % train.eval_interval != 0)


def eval_seconds(exp: Experiment, tokens_per_s: float, params: int) -> float:
    """One evaluation: hardware.eval_seconds (fwray.plan's figure), else eval_iters forward passes at FORWARD_SPEEDUP
    x the training speed, the checkpoint and the fixed costs."""
    if exp.hardware.eval_seconds is not None:
        return exp.hardware.eval_seconds
    t = exp.train
    tokens = t.eval_iters * (t.eval_batch_size or t.batch_size) * exp.model.block_size
    return tokens / (FORWARD_SPEEDUP * tokens_per_s) + 12 * params / CHECKPOINT_BYTES_PER_S + EVAL_FIXED_S


def predicted_speed(exp: Experiment, flops_per_tok: float, total_tokens: int, params: int) -> dict[str, float]:
    """tokens/s, seconds per evaluation and the training time (steps and evaluations) on the target, at the figure the
    plan schedules with and at the bottom of the MFU band (the same where measured or stated); nothing where the
    throughput is unknown."""
    tok_s, source = throughput(exp, flops_per_tok)
    if tok_s is None:
        return {}
    band = mfu_band(exp)
    slowest = tok_s * band[0] / band[1] if band else tok_s
    evals, eval_s = evaluations(exp.train), eval_seconds(exp, tok_s, params)
    seconds = total_tokens / tok_s + evals * eval_s
    slowest_seconds = total_tokens / slowest + evals * eval_seconds(exp, slowest, params)
    return {"predicted_tokens_per_s": tok_s, "throughput_source": source, "evaluations": evals,
            "predicted_eval_s": eval_s, "predicted_seconds": seconds, "predicted_hours": seconds / 3600,
            "slowest_tokens_per_s": slowest, "slowest_seconds": slowest_seconds,
            "slowest_hours": slowest_seconds / 3600, "mfu_band": _band(*band) if band else "none",
            "speed_measured": bool(exp.hardware.tokens_per_s and exp.hardware.tokens_per_s_measured)}


def predicted_time(fig: dict, with_band: bool = True) -> str:
    """'7.4–10.1 h (at 60–82% MFU)' from the MFU band; one figure, said to be measured, where the shape's speed was
    measured."""
    fast, slow = fig["predicted_seconds"], fig["slowest_seconds"]
    if fig["speed_measured"]:
        return f"~{duration(fast)} (measured speed)"
    band = with_band and fig["mfu_band"] != "none"
    return time_span(fast, slow) + (f" (at {fig['mfu_band']} MFU)" if band else "")


def time_span(fast: float, slow: float) -> str:
    """'7.4–10.1 h', or '~7.4 h' where the two agree."""
    if slow <= fast * 1.001:
        return f"~{duration(fast)}"
    return f"{fast / 3600:.1f}–{slow / 3600:.1f} h" if slow >= 5400 else f"{fast / 60:.1f}–{slow / 60:.1f} min"


def predicted_tokens_per_s(fig: dict) -> str:
    fast, slow = fig["predicted_tokens_per_s"], fig["slowest_tokens_per_s"]
    return f"{fast:,.0f}" if slow >= fast else f"{slow:,.0f}–{fast:,.0f}"


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
        "  time         " + (f"{predicted_time(fig, with_band=False)} of training at "
                              f"{predicted_tokens_per_s(fig)} tokens/s ({fig['throughput_source']}), "
                              f"{fig['evaluations']} evaluations of ~{fig['predicted_eval_s']:.1f} s included; the "
                              f"run logs the measured figures"
                              if "predicted_seconds" in fig else
                              "no prediction: no known GPU (set hardware.gpu, e.g. \"RTX 4070\", or "
                              "hardware.peak_tflops)"),
    ])


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def outcome(fig: dict[str, float], summary: dict, predicted_peak_gb: float | None = None,
            planned_for: str | None = None) -> dict[str, float | str]:
    """What the run measured beside what the plan (and the probe) predicted: tokens/s, training time (the engine's
    loop, evaluations included), peak memory, and the measured / predicted ratios. A run on another device than the
    card the plan was for (`planned_for`; rank 0's device in the summary) gets no ratios: they would compare two
    machines, not the plan with the run."""
    out = {"measured_tokens_per_s": summary.get("tokens_per_s"), "measured_seconds": summary.get("seconds"),
           "measured_hours": summary.get("seconds", 0) / 3600,
           "predicted_tokens_per_s": fig.get("predicted_tokens_per_s"),
           "predicted_seconds": fig.get("predicted_seconds"), "slowest_seconds": fig.get("slowest_seconds"),
           "predicted_peak_gb": predicted_peak_gb, "measured_peak_gb": summary.get("peak_reserved_gb")}
    trained_on = summary.get("device")
    if planned_for and trained_on and (hardware.normalise_gpu_name(planned_for)
                                       != hardware.normalise_gpu_name(trained_on)):
        out.update(planned_for=planned_for, trained_on=trained_on)
    else:
        for what, key in (("speed", "tokens_per_s"), ("time", "seconds")):
            if out[f"measured_{key}"] and out[f"predicted_{key}"]:
                out[f"{what}_ratio"] = out[f"measured_{key}"] / out[f"predicted_{key}"]
    return {k: v for k, v in out.items() if v is not None}


def describe_outcome(out: dict[str, float | str]) -> str:
    lines = []
    elsewhere = (f"the plan was for {out['planned_for']}, this run trained on {out['trained_on']}: no ratio"
                 if "trained_on" in out else "")
    measured = out.get("measured_tokens_per_s")
    if measured:
        line = f"  speed        measured {measured:,.0f} tokens/s"
        if out.get("speed_ratio"):
            line += (f" vs {out['predicted_tokens_per_s']:,.0f} predicted "
                     f"({out['speed_ratio']:.2f}x the plan)")
        lines.append(line)
    if out.get("measured_seconds"):
        line = f"  time         trained {duration(out['measured_seconds'])}"
        if out.get("time_ratio"):
            fast = out["predicted_seconds"]
            line += (f" vs {time_span(fast, out.get('slowest_seconds', fast))} predicted "
                     f"({out['time_ratio']:.2f}x the plan's figure)")
        elif elsewhere:
            line += f"; {elsewhere}"
        lines.append(line)
    if out.get("measured_peak_gb") is not None:
        line = f"  memory       peak {out['measured_peak_gb']:.2f} GB reserved"
        if out.get("predicted_peak_gb"):
            line += f" vs {out['predicted_peak_gb']:.2f} GB the probe measured or predicted"
        lines.append(line)
    return "\n".join(["measured against the plan"] + lines) if lines else ""
