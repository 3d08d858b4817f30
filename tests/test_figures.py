"""The plan's figures for the widely shared 4070 config, and the measured-vs-predicted comparison after a run."""
from pathlib import Path

import pytest

from fwray import config
from fwray.core import memory
from fwray.plan import figures
from fwray.probe import trial

FULL = Path(__file__).resolve().parent.parent / "experiments" / "full.yaml"
RECOMMENDED = FULL.with_name("4070.yaml")


def comments(path: Path) -> str:
    """An experiment file's comments as one line: the figures in them are held to what fwray computes."""
    return " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines() if "#" in line)


def manifest(train_tokens: int, val_tokens: int = 7_000_000) -> dict:
    return {"splits": {"train": {"documents": 1_040_000, "tokens": train_tokens},
                       "val": {"documents": 10_500, "tokens": val_tokens}}}


def test_shared_config_true_figures():
    # the shared config as people bring it: 250,000 iterations of 12 x 1024 x 40 on one ~0.7B-token shard
    exp = config.load(FULL, ["probe.enabled=false", "train.epochs=null", "train.max_iters=250000",
                             "train.warmup_iters=2000"])
    exp = config.resolve(exp, 700_000_000)
    fig = figures.figures(exp, manifest(700_000_000))
    assert fig["params"] == 64_041_472  # not "110M"
    assert fig["tokens_per_step"] == 491_520
    assert fig["total_train_tokens"] == 122_880_000_000
    assert fig["epochs"] == pytest.approx(175.54, abs=0.01)
    # an RTX 4070 in its MFU band: tens of thousands of tokens/s, i.e. weeks, not the "22-26 it/s" claimed
    assert 30_000 < fig["slowest_tokens_per_s"] < fig["predicted_tokens_per_s"] < 120_000
    assert fig["predicted_hours"] > 24 * 10
    text = figures.describe(exp, fig)
    assert "64,041,472 parameters" in text and "175.54 epochs" in text and "RTX 4070" in text
    # full.yaml's comment on the shared config quotes these figures
    span = figures.time_span(fig["predicted_seconds"], fig["slowest_seconds"])
    assert span in text and span in comments(FULL)


def test_epochs_budget_sets_the_steps():
    exp = config.resolve(config.load(FULL, ["probe.enabled=false"]), 700_000_000)
    fig = figures.figures(exp, manifest(700_000_000))
    assert fig["epochs"] == pytest.approx(4.0, rel=1e-3)
    assert exp.train.max_iters == pytest.approx(4 * 700_000_000 / 491_520, abs=1)


def test_the_recommended_4070_experiment_is_what_its_comments_say():
    exp = config.resolve(config.load(RECOMMENDED), 700_000_000)
    m, t = exp.model, exp.train
    assert (m.recipe, t.optimizer, t.schedule, exp.data.sampling) == ("speedrun", "muon", "wsd", "epoch")
    assert t.muon_split_qkv and m.embed_norm and m.unet_skips and t.decay_fraction == 0.5  # the recipe's defaults
    assert exp.probe.enabled and all(480 % b == 0 for b in exp.probe.batch_sizes)  # the step's 480 sequences
    fig = figures.figures(exp, manifest(700_000_000))
    assert fig["params"] == 162_201_606 and fig["tokens_per_step"] == 491_520 and t.max_iters == 2019
    assert fig["epochs"] == pytest.approx(2019 * 491_520 / 700_000_000, rel=1e-3)
    assert 4.8 < fig["predicted_hours"] <= 5.0  # the 5 h the file was planned for, at the top of the MFU band
    assert figures.time_span(fig["predicted_seconds"], fig["slowest_seconds"]) in comments(RECOMMENDED)
    assert f"{figures.predicted_tokens_per_s(fig)} tokens/s" in comments(RECOMMENDED)
    # the probe's CPU estimate: the configured micro-batch fits a 12 GB card with the margin, the next one does not
    cap = trial.usable_bytes(exp) * (1 - exp.probe.margin)
    reserved = {b: memory.estimate_peak_bytes(m, t, b, accumulation=2)["reserved"] for b in (12, 15)}
    assert reserved[12] < cap < reserved[15] and t.batch_size == 12


def test_unknown_gpu_predicts_no_time():
    exp = config.resolve(config.load(FULL, ["probe.enabled=false", "hardware.gpu=Some Card 9000"]), 700_000_000)
    fig = figures.figures(exp, manifest(700_000_000))
    assert "predicted_hours" not in fig
    assert "no prediction" in figures.describe(exp, fig)


def test_outcome_compares_measured_with_predicted():
    out = figures.outcome({"predicted_tokens_per_s": 50_000.0},
                       {"tokens_per_s": 56_000.0, "seconds": 7200, "peak_reserved_gb": 9.5}, predicted_peak_gb=9.0)
    assert out["measured_tokens_per_s"] == 56_000.0 and out["measured_hours"] == 2.0
    text = figures.describe_outcome(out)
    assert "1.12x the plan" in text and "9.50 GB" in text and "9.00 GB" in text
    # on CPU: no prediction, no GPU memory; the measured speed is still shown
    cpu = figures.outcome({}, {"tokens_per_s": 600.0, "seconds": 60})
    assert "predicted_tokens_per_s" not in cpu and "600 tokens/s" in figures.describe_outcome(cpu)


def test_full_yaml_comments_quote_the_planner_s_figures():
    exp = config.resolve(config.load(FULL), 700_000_000)
    fig = figures.figures(exp, manifest(700_000_000))
    text = comments(FULL)
    assert f"{exp.train.max_iters:,} steps" in text
    assert figures.time_span(fig["predicted_seconds"], fig["slowest_seconds"]) in text
    assert f"{figures.predicted_tokens_per_s(fig)} tokens/s" in text


def test_the_predicted_time_is_a_range_from_a_stated_mfu_band():
    exp = config.resolve(config.load(FULL, ["probe.enabled=false"]), 700_000_000)
    fig = figures.figures(exp, manifest(700_000_000))
    low, high = figures.MFU_BANDS["consumer"]  # a GeForce card
    assert fig["slowest_tokens_per_s"] == pytest.approx(fig["predicted_tokens_per_s"] * low / high)
    assert fig["predicted_hours"] < fig["slowest_hours"] and fig["mfu_band"] == "60–82%"
    time_line = next(line for line in figures.describe(exp, fig).splitlines() if "time" in line)
    assert f"{fig['predicted_hours']:.1f}–{fig['slowest_hours']:.1f} h of training" in time_line
    assert "60–82% MFU, the band for consumer cards" in time_line
    h200 = figures.figures(exp.with_changes("hardware", gpu="NVIDIA H200"), manifest(700_000_000))
    assert h200["mfu_band"] == "{:.0f}–{:.0%}".format(100 * figures.MFU_BANDS["datacenter"][0],
                                                      figures.MFU_BANDS["datacenter"][1])


def test_a_measured_shape_gives_one_time_and_says_measured():
    exp = config.resolve(config.load(FULL, ["probe.enabled=false", "hardware.tokens_per_s=80000",
                                            "hardware.tokens_per_s_measured=true"]), 700_000_000)
    fig = figures.figures(exp, manifest(700_000_000))
    assert fig["slowest_seconds"] == fig["predicted_seconds"] and fig["speed_measured"]
    time_line = next(line for line in figures.describe(exp, fig).splitlines() if "time" in line)
    assert "measured" in time_line and "–" not in time_line and "80,000 tokens/s" in time_line
    # the same figure from fwray.plan's estimate (not measured) still spans the band
    planned = config.resolve(config.load(FULL, ["probe.enabled=false", "hardware.tokens_per_s=80000"]), 700_000_000)
    fig = figures.figures(planned, manifest(700_000_000))
    assert fig["slowest_tokens_per_s"] < 80_000 and "top of the 60–82% MFU band" in fig["throughput_source"]


def test_a_run_on_another_device_than_the_planned_card_gives_no_ratio():
    fig = {"predicted_tokens_per_s": 90_000.0, "predicted_seconds": 12.0, "slowest_seconds": 16.4}
    out = figures.outcome(fig, {"tokens_per_s": 700.0, "seconds": 42.0, "device": "cpu"}, planned_for="RTX 4070")
    assert not any(k.endswith("_ratio") for k in out)
    text = figures.describe_outcome(out)
    assert "the plan was for RTX 4070, this run trained on cpu: no ratio" in text and "x the plan" not in text
    # the planned card itself, however torch names it: the ratios are there
    same = figures.outcome(fig, {"tokens_per_s": 80_000.0, "seconds": 14.0, "device": "NVIDIA GeForce RTX 4070"},
                           planned_for="RTX 4070")
    assert same["time_ratio"] == pytest.approx(14 / 12) and "within" not in figures.describe_outcome(same)
    assert "0.2–0.3 min predicted (1.17x the plan's figure)" in figures.describe_outcome(same)
