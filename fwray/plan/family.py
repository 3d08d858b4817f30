"""The planner's candidates, pure: a family of model shapes, each given the micro-batch that fits the card, the steps
its speed allows in the budget, and the data-constrained law's loss; the best one recommended, and why.

The family (nanochat's): depth d sets everything else. d layers, width 64·d (the aspect ratio nanochat uses), heads of
a fixed size: 64 for the gpt2 recipe (d heads; depth 12 is GPT-2 124M), 128 for the modern recipe (nanochat's head
size; width rounded up to a whole head). The other model fields (block size, vocabulary, recipe...) are the
experiment's. Tokens per optimizer step stay the experiment's: the micro-batch and accumulation change, not the step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import Experiment, ModelConfig, TrainConfig
from ..core import memory
from ..core.engine import autocast_dtype
from ..core.model import count_params, flops_per_token
from ..errors import FwrayError
from ..probe.verdict import probe_accumulation
from . import figures, scaling

ASPECT = 64  # width per layer
HEAD_SIZE = {"gpt2": 64, "modern": 128, "speedrun": 128}
DEPTHS = tuple(range(1, 33))  # the family; the table shows the recommendation and WINDOW shapes on each side
WINDOW = 3
MAX_MICRO_BATCH = 64  # larger micro-batches buy a GPU little speed
MIN_STEPS = 20  # fewer optimizer steps leave no room for warmup and decay
# Law losses this close are a tie: the fit's own scatter is larger (and the 12-hour 4070 ranking once rested on
# 0.004); a tie goes to the larger model while it repeats the data at most 4 times, where Muennighoff et al. find
# repeated tokens worth about as much as fresh ones.
TIE_MARGIN = 0.01
TIE_MAX_EPOCHS = 4.0
EVAL_EVERY_S = 900  # an evaluation (and a checkpoint) about every 15 minutes of training ...
MAX_EVALS = 50  # ... at most this many, and always one at the start and one at the end
# AdamW warms up linearly over 5% of the steps (nanoGPT's 2,000 at most); Muon runs start at full rate, as nanochat
# and modded-nanogpt do (bench/recipe_ablation.py's +warmup_0: better than modern's warmup in both seeds)
WARMUP_FRACTION, MAX_WARMUP = 0.05, 2000


class PlanError(FwrayError):
    """Nothing to plan with: no data, no card figures, a budget or a card too small for any candidate."""

    exit_code = 2


@dataclass(frozen=True)
class Target:
    """What the plan is for: a card (or this CPU), how much memory a training step may take there."""

    name: str  # "RTX 4070", or "cpu"
    device_type: str  # "cuda" or "cpu": the dtype and allocator the memory estimate assumes
    memory_gb: float  # the card's memory (cpu: this machine's)
    limit_bytes: int  # what a step may reserve: memory less the context overhead, less the probe's margin


@dataclass(frozen=True)
class Candidate:
    depth: int
    model: ModelConfig
    params: int
    flops_per_token: float
    micro_batch: int | None = None  # None: not estimated (outside the table), or nothing fits
    accumulation: int | None = None
    peak_bytes: int | None = None  # the CPU estimate at micro_batch (or at 1 when nothing fits)
    fits: bool | None = None  # None: memory not estimated
    memory_note: str = ""
    tokens_per_s: float | None = None
    speed_source: str = ""  # "peak x MFU", "measured", "scaled" (by the measured / predicted ratio), "rough"
    eval_s: float = 0.0
    max_iters: int = 0
    eval_interval: int = 1
    seconds: float = 0.0  # predicted training time (steps and evaluations)
    tokens: int = 0
    epochs: float = 0.0
    law: float = math.inf  # the law's loss (scaling.loss) of the non-embedding parameters

    @property
    def non_embedding_params(self) -> int:
        return self.params - embedding_params(self.model)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def feasible(self) -> bool:
        return bool(self.fits) and self.max_iters >= MIN_STEPS

    def describe(self) -> str:
        m = self.model
        heads = f"{m.n_head} head{'s' if m.n_head > 1 else ''}"
        return (f"depth {self.depth} ({m.n_layer} x {m.n_embd}, {heads}, {self.params / 1e6:.1f}M parameters, "
                f"{self.non_embedding_params / 1e6:.1f}M non-embedding)")


# ---------------------------------------------------------------- the family


def shape(model: ModelConfig, depth: int) -> ModelConfig:
    """The family member of `depth`, keeping the model's other fields (block size, vocabulary, recipe, ...)."""
    head = HEAD_SIZE[model.recipe]
    width = depth * ASPECT
    if width > head:
        width = -(-width // head) * head
    return dataclasses.replace(model, n_layer=depth, n_embd=width, n_head=max(1, width // head))


def family(model: ModelConfig, depths=DEPTHS) -> list[Candidate]:
    out = []
    for d in depths:
        m = shape(model, d)
        n = count_params(m)
        out.append(Candidate(d, m, n, flops_per_token(m, n)))
    return out


def sequences_per_step(exp: Experiment) -> int:
    return exp.tokens_per_step // (exp.model.block_size * exp.resources.num_workers)


def micro_batches(exp: Experiment) -> list[int]:
    """Micro-batches that keep tokens per step exact: the divisors of the sequences a worker reads per step."""
    s = sequences_per_step(exp)
    return [b for b in range(1, min(s, MAX_MICRO_BATCH) + 1) if s % b == 0]


def with_shape(exp: Experiment, c: Candidate, micro_batch: int | None = None) -> Experiment:
    """The experiment with the candidate's shape and micro-batch (accumulation keeps tokens per step). Evaluation
    reads as many tokens as the experiment's did: eval_iters follows an evaluation batch that follows the
    micro-batch."""
    exp = dataclasses.replace(exp, model=c.model)
    b = micro_batch or c.micro_batch
    if b:
        t = exp.train
        eval_iters = t.eval_iters if t.eval_batch_size else max(1, round(t.eval_iters * t.batch_size / b))
        exp = exp.with_changes("train", batch_size=b, gradient_accumulation_steps=sequences_per_step(exp) // b,
                               eval_iters=eval_iters)
    return exp


# ---------------------------------------------------------------- memory: which micro-batch fits


def peak_bytes(exp: Experiment, device_type: str, batch_size: int) -> int:
    """fwray.core.memory's CPU estimate of one training step and evaluation at `batch_size`, as the probe's trial makes it:
    reserved bytes of a CUDA run, or the live bytes of a CPU run (its dtype, no caching allocator)."""
    accumulation = probe_accumulation(exp, batch_size)
    eval_bs = exp.train.eval_batch_size or batch_size
    if device_type == "cuda":
        return memory.estimate_peak_bytes(exp.model, exp.train, batch_size, eval_batch_size=eval_bs,
                                          accumulation=accumulation)["reserved"]
    return memory.measure_peak_bytes(exp.model, exp.train, batch_size, eval_batch_size=eval_bs,
                                     accumulation=accumulation, dtype=autocast_dtype(exp.train, "cpu"))["peak"]


def fit_memory(exp: Experiment, c: Candidate, target: Target, estimate=peak_bytes) -> tuple[Candidate, int]:
    """The largest micro-batch whose estimated peak stays under the target's limit, and the estimates it took.

    An estimate costs seconds for a 124M model, so not every micro-batch is estimated: the largest (small models
    fit whole), then one whose tokens fill a loss chunk (below it the logits chunk shrinks and the peak is not
    linear); between them the peak is linear in the micro-batch, so the line through the two picks the candidate,
    which is estimated again to verify it (and stepped down until one fits)."""
    e = with_shape(exp, c, 1)
    options = micro_batches(e)
    weights = 16 * c.params  # fp32 weights, gradients and AdamW's two moments: a lower bound on any step
    if weights > target.limit_bytes:
        return dataclasses.replace(c, fits=False, memory_note=f"weights, gradients and AdamW moments alone take "
                                                              f"{weights / 2**30:.1f} GB"), 0
    peaks: dict[int, int] = {}

    def peak(b: int) -> int:
        if b not in peaks:
            peaks[b] = estimate(with_shape(exp, c, b), target.device_type, b)
        return peaks[b]

    def chosen(b: int) -> Candidate:
        return dataclasses.replace(c, micro_batch=b, accumulation=sequences_per_step(e) // b,
                                   peak_bytes=peaks[b], fits=True)

    top = options[-1]
    if peak(top) <= target.limit_bytes:
        return chosen(top), len(peaks)
    full_chunk = min((b for b in options if b * e.model.block_size >= e.train.loss_chunk_size), default=top)
    low = full_chunk if full_chunk < top else options[0]
    if peak(low) > target.limit_bytes and low != options[0]:
        low = options[0]
    if peak(low) > target.limit_bytes:
        return dataclasses.replace(c, fits=False, peak_bytes=peaks[low],
                                   memory_note=f"micro-batch {low} needs {peaks[low] / 2**30:.1f} GB"), len(peaks)
    slope = (peak(top) - peak(low)) / (top - low)
    guess = max((b for b in options if low <= b < top and peak(low) + slope * (b - low) <= target.limit_bytes),
                default=low)
    for b in sorted((b for b in options if low <= b <= guess), reverse=True):
        if peak(b) <= target.limit_bytes:
            return chosen(b), len(peaks)
    return chosen(low), len(peaks)


# ---------------------------------------------------------------- time: the steps that fit the budget


def evaluation_intervals(budget_s: float) -> int:
    return max(1, min(MAX_EVALS, round(budget_s / EVAL_EVERY_S)))


def learning_rate_scale(exp: Experiment, model: ModelConfig) -> float:
    """The experiment's AdamW learning rate is for its own width; a shape `model` wide takes it times
    (width / experiment's width)^-0.5, as nanochat scales AdamW's rate with model width (GPT-3's table falls about as
    fast: 6e-4 at 768 wide, 2.5e-4 at 1536). Muon (train.optimizer: muon) keeps its rate."""
    if exp.train.optimizer != "adamw":
        return 1.0
    return (model.n_embd / exp.model.n_embd) ** -0.5


def warmup_iters(train: TrainConfig, max_iters: int) -> int:
    """The planned warmup: none under Muon, 5% of the steps under AdamW (at most MAX_WARMUP)."""
    return 0 if train.optimizer == "muon" else min(MAX_WARMUP, round(WARMUP_FRACTION * max_iters))


def planned(exp: Experiment, c: Candidate, max_iters: int, intervals: int) -> Experiment:
    """The candidate's experiment for `max_iters` steps: its shape and micro-batch, its learning rate, warmup, decay
    to the end, `intervals` evaluation intervals, and the speed figures the run predicts its time with (a range
    unless measured)."""
    lr = learning_rate_scale(exp, c.model)
    train = exp.train
    exp = with_shape(exp, c)
    return dataclasses.replace(
        exp,
        train=dataclasses.replace(exp.train, max_iters=max_iters, epochs=None, lr_decay_iters=max_iters,
                                  warmup_iters=warmup_iters(train, max_iters),
                                  eval_interval=max(1, math.ceil(max_iters / intervals)),
                                  learning_rate=float(f"{train.learning_rate * lr:.3g}"),
                                  min_lr=float(f"{train.min_lr * lr:.3g}")),
        hardware=dataclasses.replace(exp.hardware, tokens_per_s=c.tokens_per_s, eval_seconds=c.eval_s,
                                     tokens_per_s_measured=c.speed_source == "measured"))


def schedule(exp: Experiment, c: Candidate, budget_s: float, train_tokens: int) -> Candidate:
    """The most steps whose predicted time (fwray.plan.figures: steps at tokens_per_s, evaluations at eval_s) fits the
    budget, and what they come to: tokens, epochs, the law's loss."""
    k = evaluation_intervals(budget_s)
    steps = int((budget_s - (k + 1) * c.eval_s) * c.tokens_per_s / exp.tokens_per_step)
    while steps > 0:
        e = planned(exp, c, steps, k)
        seconds = figures.predicted_speed(e, c.flops_per_token, steps * exp.tokens_per_step, c.params)[
            "predicted_seconds"]
        if seconds <= budget_s:
            break
        steps -= 1  # an evaluation more than the estimate (rounding): a step or two
    if steps <= 0:
        return dataclasses.replace(c, max_iters=0, seconds=0.0, tokens=0, epochs=0.0, law=math.inf)
    tokens = steps * exp.tokens_per_step
    return dataclasses.replace(c, max_iters=steps, eval_interval=e.train.eval_interval, seconds=seconds,
                               tokens=tokens, epochs=tokens / train_tokens,
                               law=scaling.loss(c.non_embedding_params, tokens, train_tokens))


def embedding_params(model: ModelConfig) -> int:
    """The token table, the output head where it is a matrix of its own (untied), the value embedding tables and the
    position table where the model learns one: what Kaplan et al. leave out of a model's size."""
    tables = (1 if model.tie_embeddings else 2) + model.value_embeds
    positions = model.block_size if model.positions == "learned" else 0
    return (tables * model.vocab_size + positions) * model.n_embd


def modelled_eval_seconds(exp: Experiment, c: Candidate, tokens_per_s: float) -> float:
    """fwray.plan.figures' model of one evaluation at `tokens_per_s` (at the micro-batch, or the largest before it is
    known)."""
    return figures.eval_seconds(with_shape(exp, c, c.micro_batch or micro_batches(exp)[-1]), tokens_per_s, c.params)


def with_speed(exp: Experiment, c: Candidate, tokens_per_s: float, source: str,
               eval_s: float | None = None) -> Candidate:
    """The candidate at `tokens_per_s`; an evaluation's cost modelled by fwray.plan.figures unless given."""
    if eval_s is None:
        eval_s = modelled_eval_seconds(exp, c, tokens_per_s)
    # rounded as the experiment file writes them: the run predicts its time from the same figures
    return dataclasses.replace(c, tokens_per_s=round(tokens_per_s, 1), speed_source=source, eval_s=round(eval_s, 2))


EVAL_RECORDS_S = 1.0  # the loss curve, the MLflow records and Ray's report of an evaluation (what no trial times)


def measured_eval_seconds(exp: Experiment, m: dict, budget_s: float) -> float:
    """One evaluation of the run, on average, from a trial's timings (fwray.probe.trial, time_evaluation): eval_iters
    batches (shared by the workers), the checkpoint written and then copied by Ray, the samples (at every evaluation
    but the first: step 0 has no state to sample from), the records."""
    k = evaluation_intervals(budget_s)
    batches = math.ceil(exp.train.eval_iters / exp.resources.num_workers)
    return (batches * m["eval_batch_s"] + 2 * m["checkpoint_s"] + m["samples_s"] * k / (k + 1) + EVAL_RECORDS_S)


# ---------------------------------------------------------------- the recommendation


def ranked(cands: list[Candidate]) -> list[Candidate]:
    """Lowest law loss first; those without enough steps last."""
    return sorted(cands, key=lambda c: (c.max_iters < MIN_STEPS, round(c.law, 4), c.depth))


def ties_larger(c: Candidate, lead: Candidate) -> bool:
    """Whether `c` is larger than the law's best, `lead`, within TIE_MARGIN of its loss and repeats the data at most
    TIE_MAX_EPOCHS times: the law cannot tell them apart, and the larger model is the better bet while it sees each
    token only a few times."""
    return (c.depth > lead.depth and c.max_iters >= MIN_STEPS and c.law <= lead.law + TIE_MARGIN
            and c.epochs <= TIE_MAX_EPOCHS)


def neighbours(cands: list[Candidate], best: Candidate) -> tuple[Candidate | None, Candidate | None]:
    """One size smaller and one larger in the family."""
    i = next(i for i, c in enumerate(cands) if c.depth == best.depth)
    return (cands[i - 1] if i > 0 else None), (cands[i + 1] if i + 1 < len(cands) else None)


def window(cands: list[Candidate], best: Candidate) -> list[Candidate]:
    i = next(i for i, c in enumerate(cands) if c.depth == best.depth)
    return cands[max(0, i - WINDOW): i + WINDOW + 1]


def why(best: Candidate, smaller: Candidate | None, larger: Candidate | None, lead: Candidate | None = None) -> str:
    """One line: what goes wrong one size either side; first, where the law's best was a smaller shape, the tie."""
    parts = []
    if lead is not None and lead.depth != best.depth:
        parts.append(f"the law puts depth {lead.depth} {best.law - lead.law:.3f} ahead, within the {TIE_MARGIN} that "
                     f"counts as a tie, and a tie goes to the larger model while it repeats the data at most "
                     f"{TIE_MAX_EPOCHS:g} times ({best.epochs:.2f} epochs here)")
        smaller = None if smaller is not None and smaller.depth == lead.depth else smaller
    if larger is not None:
        if larger.fits is False:
            parts.append(f"bigger models do not fit the card (depth {larger.depth}: {larger.memory_note})")
        elif larger.max_iters < MIN_STEPS:
            parts.append(f"bigger models get fewer than {MIN_STEPS} steps in the budget")
        elif larger.epochs < 1 <= best.epochs:
            parts.append(f"bigger models run out of time before 1 epoch (depth {larger.depth}: "
                         f"{larger.epochs:.2f} epochs)")
        elif larger.epochs < 1:
            parts.append(f"bigger models get too few steps (depth {larger.depth}: {larger.max_iters:,} steps, "
                         f"{larger.tokens / 1e6:,.2f}M tokens)")
        else:
            parts.append(f"bigger models see fewer tokens per parameter (depth {larger.depth}: "
                         f"{larger.tokens_per_param:.3g}, {larger.epochs:.1f} epochs)")
    if smaller is not None:
        if smaller.epochs > 1:
            parts.append(f"smaller ones would repeat the data {smaller.epochs:.1f} times (depth {smaller.depth}), and "
                         f"repeated tokens are worth less")
        else:
            parts.append(f"smaller ones learn less from the {smaller.tokens / 1e6:,.1f}M tokens they would see "
                         f"(depth {smaller.depth}: {smaller.tokens_per_param:.3g} tokens per parameter)")
    return "; ".join(parts) if parts else "the only candidate"
