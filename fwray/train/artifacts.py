"""What a training run writes for people to look at: the loss curve and sample generations at each evaluation.

Files are written atomically under the run folder and handed to a logger (`fwray.tracking.live.RunLogger` in training), so
they exist locally even while MLflow is away. No mlflow or ray import here.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import torch

from ..core import tokens
from ..core.model import DEFAULT_SEED, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, GPT, generate_text

LOSS_CURVE = "loss_curve.png"
# the metrics the curve draws (a restarted worker reads them back)
CURVES = ("train_loss", "val_loss", "yardstick_val_loss", "val_bpb")
SAMPLES_DIR = "samples"
# Fixed prompts: the same ones at every evaluation, so the samples show the model learning.
PROMPTS = ("The", "In this article, we will", "The most important thing about")
SAMPLE_COUNT = 3  # prompts sampled at each evaluation
SAMPLE_TOKENS = 48  # new tokens per sample: cheap even on CPU


# ---------------------------------------------------------------- loss curve


def loss_curve_png(history: dict[str, dict[int, float]], tokens_per_step: int, title: str = "") -> bytes:
    """Train and validation loss against tokens seen, and below it validation bits per byte when the run has them,
    as PNG bytes (matplotlib, Agg backend). A panel of its own: bpb leaves EOT out, so it is no rescaled loss axis."""
    with_bpb = bool(history.get("val_bpb"))
    fig = _figure_class()(figsize=(7, 6.4 if with_bpb else 4.2), dpi=100)
    axes = fig.subplots(2 if with_bpb else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    styles = {"train_loss": dict(label="train", color="tab:blue", lw=1.2),
              "val_loss": dict(label="validation", color="tab:orange", lw=1.8, marker="o", ms=3),
              "yardstick_val_loss": dict(label="yardstick", color="tab:red", lw=1.8, marker="s", ms=3)}
    for name, style in styles.items():
        _plot(ax, history.get(name), tokens_per_step, **style)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    if any(history.get(n) for n in styles):
        ax.legend()
    if with_bpb:
        _plot(axes[1], history["val_bpb"], tokens_per_step, color="tab:green", lw=1.8, marker="o", ms=3)
        axes[1].set_ylabel("validation bits/byte")
    axes[-1].set_xlabel("tokens seen")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot(ax, points: dict[int, float] | None, tokens_per_step: int, **style) -> None:
    points = sorted((points or {}).items())
    if points:
        ax.plot([s * tokens_per_step for s, _ in points], [v for _, v in points], **style)


def _figure_class():
    """matplotlib's Figure (no pyplot: no global state, nothing to close), imported here: only the process that draws
    a curve pays for its import.

    In a fresh environment that import builds matplotlib's font cache and says so on the user's terminal ("Matplotlib
    is building the font cache; this may take a moment", "generated new fontManager"): its font_manager logger is
    quiet for the import only, so later font warnings still show."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    fonts = logging.getLogger("matplotlib.font_manager")
    level = fonts.level
    fonts.setLevel(logging.ERROR)
    try:
        from matplotlib.figure import Figure
    finally:
        fonts.setLevel(level)
    return Figure


# ---------------------------------------------------------------- samples


def samples_text(model, enc, step: int, prompts=PROMPTS, max_new_tokens: int = SAMPLE_TOKENS, seed: int = DEFAULT_SEED,
                 temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K) -> str:
    parts = [f"step {step}: temperature {temperature}, top_k {top_k}, seed {seed}, {max_new_tokens} new tokens"]
    for i, prompt in enumerate(prompts):
        text = generate_text(model, enc, prompt, max_new_tokens, temperature, top_k, seed=seed + i)
        parts.append(f"--- prompt {i + 1}: {prompt!r}\n{text}")
    return "\n\n".join(parts) + "\n"


def sample_name(step: int) -> str:
    return f"step_{step:06d}.txt"


class EvalArtifacts:
    """Rank 0's loss history, and at each evaluation the loss curve and sample generations, written and logged.

    `logger` needs `artifact(path, artifact_path)`; `history` seeds the curve (a restarted worker rebuilds it from
    the run's metric history). Nothing here may stop training: a failure is reported once and the feature stops.
    """

    def __init__(self, exp, run_dir: str | os.PathLike, logger, history: dict[str, dict[int, float]] | None = None):
        self.exp, self.logger = exp, logger
        self.run_dir = Path(run_dir)
        self.history: dict[str, dict[int, float]] = {name: {} for name in CURVES}
        for name, points in (history or {}).items():
            self.history.setdefault(name, {}).update(points)
        self._enc = self._model = None
        self.broken: set[str] = set()

    def record(self, step: int, metrics: dict) -> None:
        for name in CURVES:
            value = metrics.get(name)
            if value is not None and value == value:  # NaN is no point on a curve
                self.history[name][step] = float(value)

    def on_eval(self, step: int, model_state: dict | None = None) -> None:
        """Refresh the loss curve; with the model's weights, write this evaluation's samples too."""
        self._guard("loss curve", self._curve)
        if model_state is not None:
            self._guard("samples", self._samples, step, model_state)

    def _guard(self, what: str, fn, *args) -> None:
        if what in self.broken:
            return
        try:
            fn(*args)
        except Exception as e:  # a plot or a sample is never worth a training run
            self.broken.add(what)
            print(f"fwray: warning: {what} failed ({type(e).__name__}: {e}); training goes on without it", flush=True)

    def _curve(self) -> None:
        png = loss_curve_png(self.history, self.exp.tokens_per_step, title=f"{self.exp.name}: loss")
        path = self.run_dir / LOSS_CURVE
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens.write_atomic(path, png)
        self.logger.artifact(path)

    def _samples(self, step: int, model_state: dict) -> None:
        if self._enc is None:
            self._enc = tokens.get_tokenizer(self.exp.data.tokenizer)
        if self._model is None:
            with torch.device("meta"):
                self._model = GPT(self.exp.model)
        self._model.borrow(model_state)  # the training tensors, not a copy: the sampler costs no weights memory
        text = samples_text(self._model, self._enc, step, PROMPTS[:SAMPLE_COUNT], SAMPLE_TOKENS,
                            seed=self.exp.train.seed)
        folder = self.run_dir / SAMPLES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tokens.write_atomic(folder / sample_name(step), text.encode())
        self.logger.artifact(folder / sample_name(step), SAMPLES_DIR)
