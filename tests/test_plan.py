"""fwray.plan: the family, the table's arithmetic on fixed inputs, the memory filter, the law, the data's size, the
written experiment, bad input; and once, with Ray, --gpu cpu --measure --write followed by fwray.run of the file."""
import dataclasses
from pathlib import Path

import mlflow
import pytest

from fwray import config
from fwray.config import ModelConfig
from fwray.core.model import count_params
from fwray.data import size as data_size
from fwray.data.parquet_inputs import inspect_file
from fwray.plan import family as cand
from fwray.plan import __main__ as plan_cli
from fwray.plan import figures, planner as plan, scaling
from fwray.plan.family import Target
from pipeline import sqlite_store

ROOT = Path(__file__).resolve().parent.parent
FULL = ROOT / "experiments" / "full.yaml"
SMOKE = ROOT / "experiments" / "smoke.yaml"
GIB = 2**30


def full(*overrides):
    return config.load(FULL, ["train.epochs=1", *overrides])


def data(train_tokens=700_000_000):
    return data_size.DataSize(train_tokens, 0, 0, "given", "given")


def linear_estimate(per_sequence_gb=0.5, fixed_gb=2.0, calls=None):
    """A peak that grows linearly with the micro-batch: the memory filter's input, fixed for the arithmetic."""
    def estimate(exp, device_type, batch_size):
        if calls is not None:
            calls.append(batch_size)
        return int((fixed_gb + per_sequence_gb * batch_size) * GIB)
    return estimate


CARD = Target("Test Card", "cuda", 12, int(10 * GIB))


# ---------------------------------------------------------------- the family and the law


def test_family_depth_sets_width_and_heads():
    gpt2 = cand.shape(ModelConfig(block_size=256, dropout=0.1), 12)
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head) == (12, 768, 12)  # GPT-2 124M's shape
    assert gpt2.block_size == 256 and gpt2.dropout == 0.1  # the experiment's other fields stay
    assert cand.family(ModelConfig(), [12])[0].params == 124_373_760  # vocabulary 50304, as nanoGPT trains it

    @dataclasses.dataclass(frozen=True)
    class Modern(ModelConfig):  # the recipe field another branch adds to ModelConfig
        recipe: str = "modern"

    four, three = cand.shape(Modern(), 4), cand.shape(Modern(), 3)
    assert (four.n_embd, four.n_head) == (256, 2)  # head size 128
    assert (three.n_embd, three.n_head) == (256, 2)  # 192 rounded up to whole heads


def test_law_matches_the_published_fit():
    # huggingface/datablations README, "Parametric Fit": the two models of the paper's Figure 1 (right)
    assert scaling.loss(6.34e9, 242e9, 25e9) == pytest.approx(2.2256440889984477, rel=1e-9)
    assert scaling.loss(8.67e9, 178e9, 25e9) == pytest.approx(2.2269634075087867, rel=1e-9)
    u = 1e9
    assert scaling.effective_tokens(u, u) == u  # one epoch: every token counts
    assert 3.5 * u < scaling.effective_tokens(4 * u, u) < 4 * u  # four epochs: nearly as good as new
    assert scaling.effective_tokens(100 * u, u) < (1 + scaling.R_D_STAR) * u  # a hundred: bounded
    assert scaling.optimal_params(1e9) == pytest.approx(1e9 / 19.6, rel=0.01)  # Chinchilla's ~20 tokens a parameter


def test_non_embedding_count_where_every_parameter_saturates():
    # bench/plan_bench.py, 6 minutes on 2 CPU cores (python-docs), the rate scaled with width: depth 1, 2, 3 trained
    # 1,024,000, 742,400 and 494,592 tokens and reached validation losses 4.522, 4.393 and 4.545. Counting every
    # parameter saturates (every model is far past the compute-optimal size for so few tokens) and ranks by tokens
    # alone; the non-embedding count fwray ranks with picks the shape that won, by a margin.
    unique = 3_344_032
    shapes = {c.depth: c for c in cand.family(ModelConfig(block_size=64), [1, 2, 3])}
    tokens = {1: 1_024_000, 2: 742_400, 3: 494_592}
    published = {d: scaling.loss(shapes[d].params, tokens[d], unique) for d in tokens}
    small = {d: scaling.loss(shapes[d].non_embedding_params, tokens[d], unique) for d in tokens}
    assert sorted(published, key=published.get) == [1, 2, 3]  # "most tokens wins": always the smallest shape
    assert min(small, key=small.get) == 2 and min(small[1], small[3]) - small[2] > 1  # the shape that won
    # repeated data counts for less, and so do parameters past what the unique data can use
    assert scaling.loss(1e7, 1e8, 1e7) > scaling.loss(1e7, 1e8, 1e8)
    assert scaling.loss(1e9, 1e6, 1e6) - scaling.loss(1e8, 1e6, 1e6) > -0.01


def test_non_embedding_parameters_leave_out_every_table():
    gpt2 = ModelConfig(n_layer=2, n_head=2, n_embd=128, block_size=64)
    modern = ModelConfig(n_layer=2, n_head=1, n_embd=128, block_size=64, recipe="modern")
    assert cand.embedding_params(gpt2) == (50304 + 64) * 128  # tied head, learned positions
    assert cand.embedding_params(modern) == 2 * 50304 * 128  # untied head, rotary positions
    with_values = dataclasses.replace(modern, n_layer=4, value_embeds=2, unet_skips=True)
    assert cand.embedding_params(with_values) == 4 * 50304 * 128  # and two value embedding tables
    assert count_params(with_values) - cand.embedding_params(with_values) == \
        count_params(dataclasses.replace(with_values, value_embeds=0)) - cand.embedding_params(modern) + 2 * 2 * 2


# ---------------------------------------------------------------- the table's arithmetic


def test_table_arithmetic_on_fixed_inputs():
    exp = full("probe.enabled=false")
    speed = exp.with_changes("hardware", gpu="Test Card", peak_tflops=100.0, assumed_mfu=0.5)
    budget = 6 * 3600
    p = plan.make_plan(exp, budget, data(), CARD, speed, depths=range(4, 17, 2), estimate=linear_estimate())
    by_depth = {c.depth: c for c in p.cands}
    d12 = by_depth[12]
    assert d12.params == 124_373_760
    assert d12.tokens_per_s == pytest.approx(round(0.5 * 100e12 / d12.flops_per_token, 1))
    # the micro-batch: the largest divisor of the 480 sequences a step that fits 10 GB at 2 + 0.5 b GB
    assert (d12.micro_batch, d12.accumulation) == (16, 30)
    for c in p.shown:
        assert c.tokens == c.max_iters * 491_520
        assert c.epochs == pytest.approx(c.tokens / 700_000_000)
        assert c.law == pytest.approx(scaling.loss(c.params - cand.embedding_params(c.model), c.tokens, 700_000_000))
        # the most steps whose predicted time, evaluations included, fits the budget: one more would not
        e = plan.planned_experiment(p, c)
        assert figures.predicted_speed(e, c.flops_per_token, c.tokens, c.params)["predicted_seconds"] <= budget
        more = cand.planned(exp, c, c.max_iters + 1, cand.evaluation_intervals(budget))
        assert figures.predicted_speed(more, c.flops_per_token, c.tokens + 491_520, c.params)["predicted_seconds"] \
            > budget
    lead = min((c for c in p.cands if c.feasible), key=lambda c: c.law)
    assert p.best.law <= lead.law + cand.TIE_MARGIN and p.best.depth >= lead.depth
    # the experiment's rate was for its 512-wide model: depth 16 (1024 wide) takes it / sqrt(2)
    d16 = plan.planned_experiment(p, by_depth[16]).train
    assert d16.learning_rate == pytest.approx(6e-4 / 2**0.5, rel=1e-3)
    assert d16.min_lr == pytest.approx(6e-5 / 2**0.5, rel=1e-3)
    text = plan.table(p)
    assert "used only to rank" in text and f"recommended: {p.best.describe()}" in text and "why: " in text


def test_the_4070_reference_and_the_real_shard():
    exp = full()
    speed = exp.with_changes("hardware", gpu="RTX 4070")
    d12 = cand.family(exp.model, [12])[0]
    # the public figure the consumer band's top comes from: nanoGPT's GPT-2 124M on a 4070, 9.35 s per 524,288 tokens
    assert figures.throughput(cand.with_shape(speed, d12), d12.flops_per_token)[0] == pytest.approx(524_288 / 9.35,
                                                                                                   rel=0.005)
    p = plan.make_plan(exp, 12 * 3600, data(), Target("RTX 4070", "cuda", 12, int(10.35 * GIB)), speed,
                       depths=range(6, 17), estimate=linear_estimate(0.4, 3.0))
    assert 8 <= p.best.depth <= 14 and 1 < p.best.epochs < 8  # ~100M parameters for a few epochs of 0.7B tokens
    # the time is a range from the stated band: the steps fill the budget at its top, the bottom takes 82/60 as long
    text = plan.table(p)
    assert "58.3 TFLOPS x 60–82% MFU, the band for consumer cards" in text
    recommended = next(line for line in text.splitlines() if line.startswith("recommended:"))
    assert "12.0–16.3 h (at 60–82% MFU) of training" in recommended, recommended
    # the plan's compute is below the law's fitted range, and the table says so
    assert "below the law's smallest fitted compute (1.0e19)" in text


def test_planned_warmup_is_five_percent_under_adamw_and_none_under_muon():
    d12 = cand.family(full().model, [12])[0]
    adamw = cand.planned(full(), d12, 2019, 10)
    assert adamw.train.optimizer == "adamw" and adamw.train.warmup_iters == 101
    assert cand.planned(full(), d12, 100_000, 10).train.warmup_iters == cand.MAX_WARMUP
    speedrun = config.load(ROOT / "experiments" / "4070.yaml")
    muon = cand.planned(speedrun, cand.family(speedrun.model, [12])[0], 2019, 10)
    assert muon.train.optimizer == "muon" and muon.train.warmup_iters == 0
    assert speedrun.train.warmup_iters == 0  # the file is the plan's


def test_memory_filter_estimates_few_sizes_and_fits_the_limit():
    exp = full()
    calls = []
    c = cand.family(exp.model, [12])[0]
    fitted, n = cand.fit_memory(exp, c, CARD, linear_estimate(calls=calls))
    assert fitted.fits and fitted.micro_batch == 16 and fitted.peak_bytes <= CARD.limit_bytes
    assert n == len(set(calls)) <= 4  # the largest, one that fills a loss chunk, the chosen one (not all 14 sizes)
    too_big = cand.family(exp.model, [32])[0]  # 1.7B parameters: AdamW alone needs 27 GB
    out, n = cand.fit_memory(exp, too_big, CARD, linear_estimate())
    assert not out.fits and n == 0 and "AdamW" in out.memory_note
    out, _ = cand.fit_memory(exp, c, CARD, linear_estimate(per_sequence_gb=20))  # even one sequence is too much
    assert not out.fits and "micro-batch 1 needs" in out.memory_note


def test_memory_filter_with_the_real_estimate():
    """fwray.core.memory's FakeTensor estimate on a small model: the chosen size fits, the next one would not."""
    exp = config.load(SMOKE, ["model.block_size=256", "train.batch_size=32"])  # 32 sequences a step
    c = cand.family(exp.model, [2])[0]
    limit = cand.peak_bytes(cand.with_shape(exp, c, 8), "cuda", 8) + 1
    fitted, n = cand.fit_memory(exp, c, Target("Small Card", "cuda", 1, limit))
    assert fitted.micro_batch == 8 and n <= 4
    assert cand.peak_bytes(cand.with_shape(exp, c, 16), "cuda", 16) > limit


def test_a_budget_too_small_or_a_card_too_small_is_one_plan_error():
    exp = full()
    speed = exp.with_changes("hardware", gpu="RTX 4070")
    with pytest.raises(cand.PlanError, match=r"too little for any candidate.*optimizer steps"):
        plan.make_plan(exp, 60, data(), CARD, speed, depths=[8, 12], estimate=linear_estimate())
    with pytest.raises(cand.PlanError, match=r"no candidate fits"):
        plan.make_plan(exp, 3600, data(), CARD, speed, depths=[2, 4], estimate=linear_estimate(per_sequence_gb=20))


def test_measured_speeds_replace_the_prediction_and_scale_the_rest():
    """--measure's arithmetic, with the trials' timings given: measured shapes use them, the others are scaled by
    the measured / predicted ratio, and a shape the card refuses is out."""
    exp = full("probe.enabled=false")
    speed = exp.with_changes("hardware", gpu="Test Card", peak_tflops=100.0, assumed_mfu=0.5)
    timed, refused = [], []

    def measure(exps):  # half the predicted speed; the largest shape of the first call runs out of memory
        refused.append(refused[0] if refused else max(e.model.n_layer for e in exps))
        timed.extend(e.model.n_layer for e in exps)
        return [{"oom": "OOM at step 1"} if e.model.n_layer == refused[0] else
                {"tokens_per_s": 0.5 * e.hardware.tokens_per_s, "eval_batch_s": 0.1, "checkpoint_s": 1.0,
                 "samples_s": 2.0} for e in exps]

    p = plan.make_plan(exp, 6 * 3600, data(), CARD, speed, depths=range(8, 17, 2), estimate=linear_estimate(),
                       measure=measure)
    by_depth = {c.depth: c for c in p.cands}
    assert len(timed) == len(set(timed)) >= 3  # the best and its neighbours, each timed once
    k = cand.evaluation_intervals(6 * 3600)  # samples at every evaluation but the one at step 0
    for d in set(timed) - {refused[0]}:
        c = by_depth[d]
        assert c.speed_source == "measured"
        predicted = 0.5 * 100e12 / c.flops_per_token
        assert c.tokens_per_s == pytest.approx(0.5 * predicted, rel=1e-3)
        e = cand.with_shape(exp, c)
        assert c.eval_s == pytest.approx(e.train.eval_iters * 0.1 + 2 * 1.0 + 2.0 * k / (k + 1) + cand.EVAL_RECORDS_S,
                                         abs=0.01)
    untimed = [c for c in p.cands if c.depth not in timed]
    assert untimed and all(c.speed_source == "scaled" and c.tokens_per_s == pytest.approx(
        0.25 * 100e12 / c.flops_per_token, rel=1e-3) for c in untimed)
    assert by_depth[refused[0]].fits is False and "probe's trial" in by_depth[refused[0]].memory_note
    assert p.best.depth != refused[0] and "measured on this machine" in plan.table(p)
    # a measured shape: one time, said to be measured, in the table and in the file the plan writes
    assert p.best.speed_source == "measured" and "(measured speed) of training" in plan.table(p)
    assert plan.planned_experiment(p).hardware.tokens_per_s_measured
    assert "(measured speed) of training" in plan.experiment_yaml(p, "test").split("\nname:")[0]


# ---------------------------------------------------------------- the data's size


def test_data_size_from_token_count_is_exact_and_a_sample_says_it_estimates(corpus):
    exp = config.load(SMOKE, [f"data.paths=[{corpus}]"])
    files = [inspect_file(corpus, exp.data)]
    exact = data_size.from_parquet(files, exp.data)
    # the corpus's token_count sums to 3,552,541; prepare adds an EOT per document (495) and splits by id
    assert exact.train_tokens + exact.val_tokens == 3_552_541 + 495 and exact.exact
    assert (exact.train_tokens, exact.val_tokens) == (3_344_032, 209_004)  # what fwray.prepare's manifest says
    sampled = data_size._sampled(files, exp.data)
    assert not sampled.exact and "ESTIMATE" in sampled.note
    assert sampled.train_tokens == pytest.approx(exact.train_tokens, rel=0.25)


# ---------------------------------------------------------------- the command: --write, bad input


def run_main(capsys, *argv):
    code = plan_cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_write_gives_an_experiment_fwray_run_accepts_with_the_plan_s_figures(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    code, text, err = run_main(capsys, FULL, "--hours", 12, "--gpu", "RTX 4070", "--train-tokens", 7e8,
                               "--depths", "11-12", "--write", out, f"tracking.uri={sqlite_store(tmp_path / 'm.db')}")
    assert code == 0, err
    assert "recommended: depth" in text and f"wrote {out}" in text
    head = out.read_text().split("\nname:")[0]
    assert all(line.startswith("# ") for line in head.splitlines()) and "predicted:" in head and "why:" in head
    exp = config.load(out)  # what fwray.run does first: the file needs nothing changed
    manifest = {"splits": {"train": {"documents": 1, "tokens": 700_000_000}, "val": {"documents": 1, "tokens": 1}}}
    fig = figures.figures(config.resolve(exp, 700_000_000), manifest)
    assert exp.hardware.gpu == "RTX 4070" and exp.probe.gpu_memory_gb == 12
    assert fig["predicted_seconds"] <= 12 * 3600 and fig["predicted_seconds"] > 0.98 * 12 * 3600
    assert "h (at 60–82% MFU) of training" in head  # not measured: the file states the band's range
    # the plan's MLflow run records the range and its band
    run_id = text.split("MLflow run ")[1].split()[0]
    params = mlflow.MlflowClient(sqlite_store(tmp_path / "m.db")).get_run(run_id).data.params
    assert float(params["slowest_seconds"]) > float(params["predicted_seconds"]) and params["mfu_band"] == "60–82%"
    code, _, err = run_main(capsys, FULL, "--hours", 12, "--gpu", "RTX 4070", "--train-tokens", 7e8, "--write", out,
                            f"tracking.uri={sqlite_store(tmp_path / 'm.db')}")
    assert code == 2 and err.count("\n") == 1 and "--force" in err


@pytest.mark.parametrize("argv, message", [
    (["data.paths=[/no/such/shard.parquet]", "--gpu", "RTX 4070"], "shard.parquet: file not found"),
    (["--gpu", "Some Card 9000", "--train-tokens", "1e9"], "no peak-FLOPs figure for GPU 'Some Card 9000'"),
    (["--gpu", "cpu", "--train-tokens", "1e9"], "--gpu cpu needs --measure"),
    (["--gpu", "RTX 4070", "--train-tokens", "1e9", "--hours", "0.001"], "too little for any candidate"),
    (["--gpu", "RTX 4070", "--train-tokens", "1e9", "--hours", "0"], "--hours 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    hours = [] if "--hours" in argv else ["--hours", "12"]
    code, _, err = run_main(capsys, FULL, *hours, *argv, f"tracking.uri={sqlite_store(tmp_path / 'm.db')}")
    assert code == 2
    assert err.startswith("fwray: error: ") and err.count("\n") == 1 and message in err, err


# ---------------------------------------------------------------- --measure on this CPU


def test_measure_on_cpu_times_the_best_shapes_and_writes_their_figures(ray_session, tmp_path, capsys):
    """The probe's Ray Tune trials time the shapes on this CPU; the written file carries the measured figures that
    fwray.run compares its time with (bench/plan_bench.py trains such files and shows how close they come)."""
    from mlflow.tracking import MlflowClient

    where = [f"tracking.uri={sqlite_store(tmp_path / 'm.db')}", "model.block_size=32", "train.batch_size=4",
             "train.eval_iters=2"]
    out = tmp_path / "planned.yaml"
    code, text, err = run_main(capsys, SMOKE, "--hours", 0.05, "--gpu", "cpu", "--measure", "--depths", "1",
                               "--write", out, *where)
    assert code == 0, err
    assert "measure: depth 1:" in text and "measured on this machine" in text
    exp = config.load(out)
    assert exp.hardware.gpu == "cpu" and exp.resources.use_gpu is False and exp.probe.enabled is False
    assert exp.hardware.tokens_per_s > 0 and exp.hardware.eval_seconds > 0
    row = next(line for line in text.splitlines() if line.startswith(f"  > {exp.model.n_layer} "))
    assert f"{exp.hardware.tokens_per_s:,.0f} measured" in row
    manifest = {"splits": {"train": {"documents": 206, "tokens": 1_481_455}, "val": {"documents": 12, "tokens": 1}}}
    fig = figures.figures(config.resolve(exp, 1_481_455), manifest)
    assert 0.97 * 180 < fig["predicted_seconds"] <= 180  # the run predicts the plan's time from the file alone
    assert exp.hardware.tokens_per_s_measured and "(measured speed)" in figures.describe(exp, fig)  # one time
    out_of_run = figures.outcome(fig, {"tokens_per_s": exp.hardware.tokens_per_s, "seconds": 190.0})
    assert out_of_run["time_ratio"] == pytest.approx(190 / fig["predicted_seconds"])
    client = MlflowClient(tracking_uri=sqlite_store(tmp_path / "m.db"))
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    assert run.data.tags["fwray.kind"] == "plan" and run.data.params["speed_source"] == "measured"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"plan_table.txt", "plan.json", "planned.yaml"}


def test_a_cpu_trial_is_sized_for_the_micro_steps_it_runs():
    """The planner's CPU trials take the probe's accumulation rule, multi-worker branch included: with two workers a
    trial runs two micro-steps a step even where training does not accumulate, and its timed steps count both."""
    from fwray.plan import measure
    from fwray.probe.verdict import probe_accumulation

    exp = config.load(SMOKE, ["resources.num_workers=2", "hardware.tokens_per_s=1000",
                             "train.gradient_accumulation_steps=1"])
    assert probe_accumulation(exp, exp.train.batch_size) == 2
    per_step = exp.train.batch_size * 2 * exp.model.block_size
    timed = measure.trial_steps(exp, gpu=False) - measure.CPU_TRIAL_WARMUP_STEPS
    assert timed == -(-measure.CPU_TRIAL_TIMED_S * 1000 // per_step) == 5


def test_a_tie_goes_to_the_larger_model_while_it_repeats_the_data_at_most_four_times():
    model = ModelConfig(block_size=64)
    lead = dataclasses.replace(cand.family(model, [9])[0], max_iters=1000, law=3.300, epochs=2.0)
    larger = cand.family(model, [10])[0]
    assert cand.ties_larger(dataclasses.replace(larger, max_iters=900, law=3.300 + cand.TIE_MARGIN, epochs=4.0), lead)
    assert not cand.ties_larger(dataclasses.replace(larger, max_iters=900, law=3.311, epochs=2.0), lead)  # beyond
    assert not cand.ties_larger(dataclasses.replace(larger, max_iters=900, law=3.301, epochs=4.1), lead)  # repeats
    assert not cand.ties_larger(dataclasses.replace(larger, max_iters=cand.MIN_STEPS - 1, law=3.3, epochs=1), lead)
    smaller = dataclasses.replace(cand.family(model, [8])[0], max_iters=1100, law=3.300, epochs=2.2)
    assert not cand.ties_larger(smaller, lead)
    why = cand.why(dataclasses.replace(larger, law=3.305, epochs=1.8), lead, None, lead)
    assert why.startswith("the law puts depth 9 0.005 ahead, within the 0.01 that counts as a tie") and "1.80 epochs" \
        in why and "smaller ones" not in why  # the smaller neighbour is the lead: the tie says why not it
