"""The plan, pure (no ray, no mlflow): what to train on this data, on this card, in H hours of training.

The data's size comes from the prepared cache, else the parquet's token_count column, else a tokenized sample
(fwray.data.size). Each shape of the family (fwray.plan.family) gets the micro-batch that fits the card
(fwray.core.memory's CPU estimate, the probe's margin), a speed (the card's peak x MFU, fwray.plan.figures; with
--measure the probe's Ray Tune trials time the best shapes on this machine: fwray.plan.measure), the steps that fit the
budget with their evaluations, and the loss of Muennighoff et al.'s data-constrained law (fwray.plan.scaling), used only
to rank them. `python -m fwray.plan` (fwray/plan/__main__.py) prints the plan, logs it as an MLflow run (tag
fwray.kind=plan), and with --write writes an experiment file that `python -m fwray.run` trains.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

from .. import __version__, config
from ..config import Experiment
from ..data.size import DataSize
from . import family as cand, figures, scaling
from .family import Candidate, PlanError, Target

TABLE = "plan_table.txt"


@dataclass
class Plan:
    exp: Experiment
    target: Target
    budget_s: float
    data: DataSize
    cands: list[Candidate]  # the whole family, in depth order
    best: Candidate
    smaller: Candidate | None
    larger: Candidate | None
    why: str
    speed_note: str
    estimates: int = 0
    estimate_s: float = 0.0

    @property
    def shown(self) -> list[Candidate]:
        return cand.window(self.cands, self.best)


# ---------------------------------------------------------------- the plan (pure)


def make_plan(exp: Experiment, budget_s: float, data: DataSize, target: Target, speed_exp: Experiment,
              depths=cand.DEPTHS, estimate=cand.peak_bytes,
              measure: Callable[[list[Experiment]], list[dict | None]] | None = None) -> Plan:
    """Rank the family by the law's loss, keep the best that fits the card, and fill in the table around it.

    speed_exp: the experiment whose hardware section gives the predicted speed (peak x MFU). measure: times
    experiments on the target (the --measure path), returning for each None (not timed), {"oom": why} (it did not
    fit the card) or the trial's timings: tokens_per_s (of the run, all workers), eval_batch_s, checkpoint_s,
    samples_s."""
    # a plan file fed back in: its figures were for its own shape, not the family's
    unplanned = dict(tokens_per_s=None, eval_seconds=None, tokens_per_s_measured=False)
    exp = exp.with_changes("hardware", **unplanned)
    speed_exp = speed_exp.with_changes("hardware", **unplanned)
    search = _Search(exp, speed_exp, target, estimate, budget_s, data.train_tokens)
    cands = search.scheduled_family(depths)
    cands, best = search.first_best(cands, can_measure=measure is not None)
    scale = 1.0
    if measure is not None:
        cands, best, scale = search.measured_around(cands, best, measure)
    shown = {c.depth for c in cand.window(cands, best)}
    cands = [search.fitted(c) if c.depth in shown else c for c in cands]
    best = next(c for c in cands if c.depth == best.depth)
    smaller, larger = cand.neighbours(cands, best)
    lead = cand.ranked([c for c in cands if c.feasible])[0]
    return Plan(exp, target, budget_s, data, cands, best, smaller, larger, cand.why(best, smaller, larger, lead),
                _speed_note(speed_exp, cands, best, scale), search.estimates, search.estimate_s)


@dataclass
class _Search:
    """One plan's search through the family: the experiment, where speeds come from, the card and the budget, and
    how many memory estimates it made (and their seconds)."""

    exp: Experiment
    speed_exp: Experiment
    target: Target
    estimate: Callable
    budget_s: float
    train_tokens: int
    estimates: int = 0
    estimate_s: float = 0.0

    def scheduled_family(self, depths) -> list[Candidate]:
        """Every shape with its predicted speed and the steps that fit the budget."""
        cands = [_speed(self.speed_exp, c) for c in cand.family(self.exp.model, depths)]
        if any(c.tokens_per_s is None for c in cands):
            raise PlanError(f"{self.exp.source}: no speed for {self.target.name!r}: "
                            f"{figures.throughput(self.speed_exp, 1.0)[1]}; or run with --measure on that card")
        return [cand.schedule(self.exp, c, self.budget_s, self.train_tokens) for c in cands]

    def fitted(self, c: Candidate) -> Candidate:
        """The candidate with the micro-batch that fits the card (estimated once), rescheduled at it."""
        if c.fits is not None:
            return c
        start = time.perf_counter()
        c, n = cand.fit_memory(self.exp, c, self.target, self.estimate)
        self.estimates += n
        self.estimate_s += time.perf_counter() - start
        # the evaluation's cost follows the micro-batch: time again with it
        return cand.schedule(self.exp, _speed(self.speed_exp, c), self.budget_s, self.train_tokens) if c.fits else c

    def best_of(self, cands: list[Candidate]) -> tuple[list[Candidate], Candidate | None]:
        """The best-ranked candidate that fits and gets enough steps, or the largest that ties with it
        (cand.ties_larger); None if none. Memory is estimated in rank order, as far as needed."""
        cands = list(cands)
        for c in cand.ranked(cands):
            if c.max_iters < cand.MIN_STEPS:
                break
            i = cands.index(c)
            cands[i] = self.fitted(c)
            if cands[i].feasible:
                return self.tie_broken(cands, cands[i])
        return cands, None

    def tie_broken(self, cands: list[Candidate], lead: Candidate) -> tuple[list[Candidate], Candidate]:
        """The largest shape that ties with the law's best `lead` and fits, else `lead`."""
        for c in sorted((c for c in cands if cand.ties_larger(c, lead)), key=lambda c: -c.depth):
            i = cands.index(c)
            cands[i] = self.fitted(c)
            if cands[i].feasible and cand.ties_larger(cands[i], lead):  # fitted at its micro-batch: still a tie
                return cands, cands[i]
        return cands, lead

    def too_little(self, cands: list[Candidate], measured: str = "") -> PlanError:
        fastest = max(cands, key=lambda c: c.max_iters)
        return PlanError(f"{self.budget_s / 3600:g} h is too little for any candidate{measured}: the fastest, "
                         f"{fastest.describe()}, gets {fastest.max_iters} of the {cand.MIN_STEPS} optimizer steps of "
                         f"{self.exp.tokens_per_step:,} tokens a plan needs; give more --hours or fewer tokens per "
                         f"step (train.batch_size x gradient_accumulation_steps)")

    def first_best(self, cands: list[Candidate], can_measure: bool) -> tuple[list[Candidate], Candidate]:
        """The best at predicted speeds; or, when none gets enough steps but a measurement may say otherwise, the
        fastest shape to time. Nothing feasible: one line saying why."""
        cands, best = self.best_of(cands)
        if best is None and can_measure and all(c.max_iters < cand.MIN_STEPS for c in cands):
            # a rough figure only picks what to time: time the fastest shapes, then decide
            best = self.fitted(min(cands, key=lambda c: c.depth))
            cands = [best if c.depth == best.depth else c for c in cands]
        if best is None and all(c.max_iters < cand.MIN_STEPS for c in cands):
            raise self.too_little(cands)
        if best is None:
            smallest = next(c for c in cands if c.fits is False)
            raise PlanError(f"no candidate fits {self.target.name} ({self.target.limit_bytes / 2**30:.2f} GB usable "
                            f"with the probe's margin): {smallest.describe()}: {smallest.memory_note}; shorten "
                            f"model.block_size or plan for a bigger card")
        return cands, best

    def measured_around(self, cands: list[Candidate], best: Candidate, measure: Callable
                        ) -> tuple[list[Candidate], Candidate, float]:
        """Time the best and its neighbours on the card; once more if that moves the best. Returns the candidates at
        the measured speeds (the others scaled by what the measurements said), the new best, and that scale."""
        measured: set[int] = set()
        scale = 1.0
        for _ in range(2):
            smaller, larger = cand.neighbours(cands, best)
            todo = [self.fitted(c) for c in (smaller, best, larger) if c is not None and c.depth not in measured]
            todo = [c for c in todo if c.fits]
            if not todo:
                break
            for c in todo:
                cands[[x.depth for x in cands].index(c.depth)] = c
            # each with its predicted speed: a CPU trial sizes its timed steps by it
            shaped = [cand.with_shape(self.exp, c).with_changes("hardware", tokens_per_s=c.tokens_per_s)
                      for c in todo]
            results = measure(shaped)
            timed = {c.depth: (m["tokens_per_s"], cand.measured_eval_seconds(e, m, self.budget_s))
                     for c, e, m in zip(todo, shaped, results) if m and "oom" not in m}
            for c, m in zip(todo, results):  # the card said no: the estimate was wrong for this one
                if m and "oom" in m:
                    cands[[x.depth for x in cands].index(c.depth)] = dataclasses.replace(
                        c, fits=False, memory_note=f"{m['oom']} at micro-batch {c.micro_batch} in the probe's trial")
            measured |= {c.depth for c in todo}
            cands, scale = _with_measurements(self.exp, self.speed_exp, cands, timed, self.budget_s,
                                              self.train_tokens)
            cands, best = self.best_of(cands)
            if best is None:
                raise self.too_little(cands, f" at the speeds measured on {self.target.name}")
        return cands, best, scale


def _speed_note(speed_exp: Experiment, cands: list[Candidate], best: Candidate, scale: float) -> str:
    """Where the plan's speeds come from: the measured depths and the scale applied to the rest, or the prediction."""
    predicted = (f"this CPU's fp32 matmul speed, {speed_exp.hardware.peak_tflops:.3g} TFLOPS, x "
                 f"{figures.GENERIC_MFU:.0%} (rough)" if speed_exp.hardware.gpu == "cpu" else
                 figures.throughput(cand.with_shape(speed_exp, best), best.flops_per_token)[1])
    timed = sorted(c.depth for c in cands if c.speed_source == "measured")
    return (f"measured on this machine by the probe's trials (depth {', '.join(map(str, timed))}); the other shapes "
            f"at {scale:.2f}x the prediction from {predicted}" if timed else predicted)


def _predicted(speed_exp: Experiment, c: Candidate) -> float | None:
    """tokens/s at the target's peak x MFU (for the CPU: its matmul speed x the generic MFU)."""
    return figures.throughput(cand.with_shape(speed_exp, c), c.flops_per_token)[0]


def _speed(speed_exp: Experiment, c: Candidate) -> Candidate:
    """The candidate at its predicted speed, or as measured (or scaled) before; the evaluation's cost for its
    micro-batch."""
    if c.speed_source in ("measured", "scaled"):  # their evaluation's cost came with the measurement
        return cand.with_speed(speed_exp, c, c.tokens_per_s, c.speed_source, c.eval_s)
    tok_s = _predicted(speed_exp, c)
    if tok_s is None:
        return c
    return cand.with_speed(speed_exp, c, tok_s, "rough" if speed_exp.hardware.gpu == "cpu" else "peak x MFU")


def _with_measurements(exp, speed_exp, cands, results: dict, budget_s, train_tokens) -> tuple[list[Candidate], float]:
    """Measured speeds and evaluation costs where timed; the others' predictions scaled by the measured / predicted
    ratios (geometric means over every shape measured so far)."""
    cands = [cand.with_speed(speed_exp, c, results[c.depth][0], "measured", results[c.depth][1])
             if results.get(c.depth) else c for c in cands]
    measured = [c for c in cands if c.speed_source == "measured"]

    def mean_ratio(ratios):
        return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else 1.0

    scale = mean_ratio([c.tokens_per_s / _predicted(speed_exp, c) for c in measured])
    eval_scale = mean_ratio([c.eval_s / cand.modelled_eval_seconds(speed_exp, c, c.tokens_per_s) for c in measured])
    out = []
    for c in cands:
        if c.speed_source != "measured":
            tok_s = _predicted(speed_exp, c) * scale
            c = cand.with_speed(speed_exp, c, tok_s, "scaled",
                                cand.modelled_eval_seconds(speed_exp, c, tok_s) * eval_scale)
        out.append(cand.schedule(exp, c, budget_s, train_tokens))
    return out, scale


# ---------------------------------------------------------------- what the plan prints and writes (pure)


def _tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _row(c: Candidate, best: Candidate) -> tuple[str, ...]:
    m = c.model
    mb = (f"{c.micro_batch} x {c.accumulation}" if c.fits else "no fit" if c.fits is False else "-")
    peak = f"{c.peak_bytes / 2**30:.2f}" if c.peak_bytes else "-"
    steps_ok = c.max_iters >= cand.MIN_STEPS
    return (("> " if c.depth == best.depth else "  ") + str(c.depth), f"{m.n_layer} x {m.n_embd}, {m.n_head}h",
            f"{c.params / 1e6:.1f}M", f"{c.flops_per_token / 1e6:,.0f}", mb, peak,
            f"{c.tokens_per_s:,.0f} {c.speed_source}", f"{c.max_iters:,}" if steps_ok else f"<{cand.MIN_STEPS}",
            _tokens(c.tokens), f"{c.epochs:.2f}", f"{c.tokens_per_param:.3g}",
            f"{c.law:.3f}" if steps_ok else "-")


def table(plan: Plan) -> str:
    t, b, exp = plan.target, plan.best, plan.exp
    head_size = cand.HEAD_SIZE[exp.model.recipe]
    width = f"{cand.ASPECT}d wide" + (f" rounded up to whole heads of {head_size}" if head_size > cand.ASPECT else "")
    head = ("depth", "shape", "params", "MFLOP/tok", "micro x acc", "est. GB", "tokens/s", "steps", "tokens",
            "epochs", "tok/param", "law loss")
    rows = [head] + [_row(c, b) for c in plan.shown]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) if i not in (1, 6) else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    hidden = len(plan.cands) - len(plan.shown)
    pred = figures.predicted_speed(planned_experiment(plan), b.flops_per_token, b.tokens, b.params)
    return "\n".join([
        f"plan for {exp.name!r} ({exp.source}): {plan.budget_s / 3600:g} h of training on {t.name} "
        f"({t.memory_gb:g} GB; a step may reserve {t.limit_bytes / 2**30:.2f} GB with the probe's "
        f"{exp.probe.margin:.0%} margin)",
        f"data     {plan.data.train_tokens:,} train tokens"
        + (f", {plan.data.documents:,} documents" if plan.data.documents else "") + f" ({plan.data.note})",
        f"family   depth d: d layers x {width}, head size {head_size} ({exp.model.recipe} recipe), block "
        f"{exp.model.block_size}; every candidate at {exp.tokens_per_step:,} tokens per optimizer step",
        f"speed    {plan.speed_note}",
        f"memory   fwray.core.memory's CPU estimate: {plan.estimates} estimates in {plan.estimate_s:.0f} s (the largest "
        f"micro-batch and a small one per shape, the chosen one verified; remembered in .fwray/plan)",
        "", *lines, "",
        f"tokens/s: peak x MFU = the card's peak at the top of the MFU band above; measured = the probe's trial on "
        f"this machine; scaled = the prediction times the measured / predicted ratio; rough = this CPU's matmul "
        f"speed at {figures.GENERIC_MFU:.0%}",
        "law loss: Muennighoff et al. 2023's data-constrained scaling law (C4 units) of the non-embedding parameters, "
        "used only to rank the candidates; not the loss the run will reach" +
        (f"; {hidden} other depths not shown" if hidden else ""),
        f"          within {cand.TIE_MARGIN} of the best is a tie, which goes to the larger model while it repeats the "
        f"data at most {cand.TIE_MAX_EPOCHS:g} times",
        *([f"          {_flops(b.flops_per_token * b.tokens)} FLOPs is below the law's smallest fitted compute "
           f"({_flops(scaling.FITTED_MIN_FLOPS)}): an extrapolation"] if b.flops_per_token * b.tokens
          < scaling.FITTED_MIN_FLOPS else []),
        f"time: steps at the speed shown (the band's top) plus {pred['evaluations']} evaluations (~{b.eval_s:.1f} s "
        f"each, checkpoint included) within the budget; preparing the data and starting Ray come on top",
        "",
        f"recommended: {b.describe()}, micro-batch {b.micro_batch} x {b.accumulation} accumulation, {b.max_iters:,} "
        f"steps = {_tokens(b.tokens)} tokens = {b.epochs:.2f} epochs, {b.tokens_per_param:.3g} tokens per parameter, "
        f"{figures.predicted_time(pred)} of training",
        f"why: {plan.why}",
        *([f"note: {_exhausted(b)}"] if b.epochs > scaling.R_D_STAR else []),
    ])


def _flops(n: float) -> str:
    return f"{n:.1e}".replace("e+", "e")


def _exhausted(c: Candidate) -> str:
    return (f"{c.epochs:.0f} epochs: past ~{scaling.R_D_STAR:.0f} repetitions more passes over the same data are worth "
            f"little (the law's R*_D) and the candidates barely differ; a shorter budget, or more data, would do as "
            f"well")


def planned_experiment(plan: Plan, c: Candidate | None = None) -> Experiment:
    """The experiment `python -m fwray.run` trains for candidate `c` (the recommendation by default)."""
    c = c or plan.best
    exp = cand.planned(plan.exp, c, c.max_iters, cand.evaluation_intervals(plan.budget_s))
    cpu = plan.target.device_type == "cpu"
    # the file may be written anywhere: data paths absolute, not relative to the experiment it came from
    exp = exp.with_changes("data", paths=tuple(p if "://" in p else os.path.abspath(p) for p in exp.data.paths))
    exp = exp.with_changes("hardware", gpu=plan.target.name)
    if cpu:  # nothing for a probe to check on a CPU
        return exp.with_changes("probe", enabled=False).with_changes("resources", use_gpu=False)
    options = cand.micro_batches(exp)
    i = options.index(c.micro_batch)
    # on the card, the probe checks the estimate's choice against the sizes either side
    return exp.with_changes("probe", gpu_memory_gb=plan.target.memory_gb,
                            batch_sizes=tuple(options[max(0, i - 1): i + 2]))


def experiment_yaml(plan: Plan, command: str, c: Candidate | None = None) -> str:
    """The planned experiment as a YAML file, its header stating the plan's figures."""
    c = c or plan.best
    exp = planned_experiment(plan, c)
    pred = figures.predicted_speed(exp, c.flops_per_token, c.tokens, c.params)
    header = [
        f"Planned by fwray {__version__} on {time.strftime('%Y-%m-%d %H:%M')}: {command}",
        f"data: {plan.data.train_tokens:,} train tokens ({plan.data.note})",
        f"card: {plan.target.name}, {plan.target.memory_gb:g} GB; speed: {plan.speed_note}",
        f"model: {c.describe()}, {c.flops_per_token / 1e6:,.0f} MFLOP per token",
        f"step: micro-batch {c.micro_batch} x {c.accumulation} accumulation x {exp.model.block_size} tokens = "
        f"{exp.tokens_per_step:,} tokens" + (f" (estimated peak {c.peak_bytes / 2**30:.2f} GB of "
                                              f"{plan.target.limit_bytes / 2**30:.2f} GB)" if c.peak_bytes else ""),
        f"budget: {plan.budget_s / 3600:g} h => {c.max_iters:,} steps = {c.tokens:,} tokens = {c.epochs:.2f} epochs, "
        f"{c.tokens_per_param:.3g} tokens per parameter; law loss {c.law:.3f} (ranking only)",
        f"predicted: {figures.predicted_tokens_per_s(pred)} tokens/s ({c.speed_source}); "
        f"{figures.predicted_time(pred)} of training with {pred['evaluations']} evaluations of ~{c.eval_s:.1f} s",
        f"why: {plan.why}" if c.depth == plan.best.depth else
        f"a neighbour of the recommendation, {plan.best.describe()}",
        "hardware.tokens_per_s and hardware.eval_seconds are the plan's figures: the run compares its time with them "
        "(remove them if you change the model)",
    ]
    return "".join(f"# {line}\n" for line in header) + config.to_yaml(exp)
