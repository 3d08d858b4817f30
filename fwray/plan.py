"""The plan: the true figures of an experiment over its prepared data, shown before training and logged; and the
probe's verdict: which candidates fit, which one to train with, the accumulation that keeps tokens per step."""
from __future__ import annotations

import torch

from . import hardware
from .config import Experiment
from .errors import ProbeError
from .trial import accumulation_for
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


# ---------------------------------------------------------------- the probe's verdict

# tokens/s within 2% of the fastest count as a tie and the larger micro-batch wins: a few timed steps of a trial
# vary by about that much, and a larger micro-batch means fewer accumulation steps for the same tokens per step
TIE = 0.02

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
        rule = f"fastest tokens/s that fits (within {TIE:.0%} counts as a tie: larger micro-batch)"
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
    largest = max(r["batch_size"] for r in results)
    if any(r["fits"] and r["batch_size"] == largest for r in results):
        verdict["ceiling"] = (f"the largest candidate, micro-batch {largest}, fits: larger ones may too (list larger "
                              f"probe.batch_sizes to find where memory runs out)")
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
    head = (f"probe of {verdict['experiment']!r}: PyTorch may reserve {verdict['cap_gb']:.2f} GB of the card, margin "
            f"{verdict['margin']:.0%} => fits when peak reserved <= {verdict['limit_gb']:.2f} GB")
    c = verdict["chosen"]
    if c:
        diff = c["tokens_per_step_difference"]
        tail = (f"chosen: micro-batch {c['batch_size']} x {c['gradient_accumulation_steps']} accumulation"
                f"{' with activation checkpointing' if c['activation_checkpointing'] else ''} = "
                f"{c['tokens_per_step']:,} tokens per step (configured {verdict['configured']['tokens_per_step']:,}, "
                f"{diff:+,} = {diff / verdict['configured']['tokens_per_step']:+.2%}); rule: {c['rule']}")
    else:
        tail = f"nothing fits: {verdict['error']}"
    if verdict.get("ceiling"):
        tail += f"\nnote: {verdict['ceiling']}"
    return "\n".join([head, *lines, tail])
