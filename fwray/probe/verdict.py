"""The probe's verdict, pure: which candidates fit, which one to train with, the accumulation that keeps tokens per
step."""
from __future__ import annotations

from ..config import Experiment
from ..errors import ProbeError


def probe_accumulation(exp: Experiment, batch_size: int) -> int:
    """Micro-steps a trial runs per step: 2 where training accumulates (the 2nd micro-batch's forward runs with the
    1st one's gradients alive) and under DDP (its buckets hold the gradients through every forward), else 1."""
    return 2 if exp.resources.num_workers > 1 else min(exp.accumulation_for(batch_size), 2)


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
    accum = exp.accumulation_for(pick["batch_size"])
    tokens = exp.with_changes("train", batch_size=pick["batch_size"], gradient_accumulation_steps=accum).tokens_per_step
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
