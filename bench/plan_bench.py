"""fwray.plan against training: plan a short CPU budget with --gpu cpu --measure, train the recommendation and its two
neighbours (one size smaller, one larger) for that budget through the real pipeline (fwray.run: Ray Data, Ray Train,
MLflow), and print predicted vs measured training time and each one's final validation loss.

  python bench/plan_bench.py                      # 6 minutes of training each (~25 min in all on 2 cores)
  python bench/plan_bench.py --minutes 2          # the same, shorter
  python bench/plan_bench.py --parquet FILE       # your own data (default: ../shared/corpus/python-docs.parquet)

Goals: every measured training time within 15% of the plan; the recommendation's final validation loss no worse than
either neighbour's by more than 0.02. The three runs read the same validation windows, so their losses compare.
Timings on a shared CPU move with its load: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken"))
from fwray import config  # noqa: E402
from fwray.plan import __main__ as plan_cli  # noqa: E402
from fwray.plan import planner  # noqa: E402
from fwray.plan.family import neighbours  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "python-docs.parquet"
SMOKE = ROOT / "experiments" / "smoke.yaml"
# the smoke experiment (block 64, 16 x 64 = 1,024 tokens a step, learning rate 3e-3) evaluating 16 batches, so the
# final losses are measured on 16K validation tokens, the same windows for every run
SETTINGS = ["train.eval_iters=16", "train.log_interval=10"]
GOAL_TIME, GOAL_LOSS = 0.15, 0.02


def trio(p: planner.Plan) -> list[tuple[str, object]]:
    """The recommendation and its neighbours; at the family's edge, the two nearest on the other side."""
    smaller, larger = neighbours(p.cands, p.best)
    if smaller is None:
        smaller, larger = larger, neighbours(p.cands, larger)[1]
        roles = ("larger", "larger by two")
    elif larger is None:
        larger, smaller = smaller, neighbours(p.cands, smaller)[0]
        roles = ("smaller by two", "smaller")
    else:
        roles = ("smaller", "larger")
    return sorted([(roles[0], smaller), ("recommended", p.best), (roles[1], larger)], key=lambda r: r[1].depth)


def outcome(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    top = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    val = max(client.get_metric_history(top.info.run_id, "val_loss"), key=lambda m: m.step)
    tags = {k.removeprefix("fwray.outcome."): float(v) for k, v in top.data.tags.items()
            if k.startswith("fwray.outcome.")}  # a run shorter than two log intervals measures no tokens/s
    return {"predicted_s": tags["predicted_seconds"], "measured_s": tags["measured_seconds"],
            "speed_ratio": tags.get("speed_ratio", math.nan), "val_loss": val.value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=6.0, help="training budget of each run (default 6)")
    p.add_argument("--parquet", default=str(CORPUS if CORPUS.is_file() else ROOT / "experiments/smoke-sample.parquet"))
    p.add_argument("--depths", default="1-8", help="the family's depths to plan over (default 1-8)")
    p.add_argument("--out", help="folder for the runs, the MLflow store and the cache (default: a temporary one)")
    args = p.parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="plan-bench-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    where = [f"data.paths=[{Path(args.parquet).resolve()}]", f"tracking.uri={uri}",
             f"resources.storage_path={folder / 'runs'}", f"data.cache_dir={folder / 'cache'}"]
    load_before = os.getloadavg()
    argv = [str(SMOKE), "--hours", str(args.minutes / 60), "--gpu", "cpu", "--measure", "--depths", args.depths,
            *SETTINGS, *where]
    exp = config.load(SMOKE, [*SETTINGS, *where, "train.epochs=1"])
    the_plan = plan_cli.plan_command(exp, plan_cli.parse_args(argv), "python -m fwray.plan " + " ".join(argv))

    from fwray import run as fwrun

    rows = []
    for role, c in trio(the_plan):
        path = folder / f"depth-{c.depth}.yaml"
        path.write_text(planner.experiment_yaml(the_plan, "bench/plan_bench.py", c))
        name = f"plan-bench-d{c.depth}"
        print(f"\n=== {role}: {c.describe()}: {c.max_iters} steps planned in {args.minutes:g} min ===", flush=True)
        assert fwrun.run(config.load(path, [f"tracking.experiment={name}"])) == 0
        rows.append((role, c, outcome(uri, name)))

    print(f"\nplan_bench: {args.minutes:g} min of training each on this CPU ({os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after); data {args.parquet}")
    print(f"{'role':<15}{'depth':>6}{'params':>9}{'steps':>7}{'predicted':>11}{'measured':>10}{'time x':>8}"
          f"{'tok/s x':>9}{'val loss':>10}{'vs rec':>8}")
    rec = next(o for role, _, o in rows if role == "recommended")
    for role, c, o in rows:
        print(f"{role:<15}{c.depth:>6}{c.params / 1e6:>8.1f}M{c.max_iters:>7}{o['predicted_s']:>10.0f}s"
              f"{o['measured_s']:>9.0f}s{o['measured_s'] / o['predicted_s']:>8.2f}"
              f"{o['speed_ratio']:>9.2f}{o['val_loss']:>10.3f}"
              f"{o['val_loss'] - rec['val_loss']:>+8.3f}")
    worst_time = max(abs(o["measured_s"] / o["predicted_s"] - 1) for _, _, o in rows)
    best_other = min(o["val_loss"] for role, _, o in rows if role != "recommended")
    print(f"goal: measured time within {GOAL_TIME:.0%} of the plan: worst {worst_time:.1%} -> "
          f"{'met' if worst_time <= GOAL_TIME else 'NOT met'}")
    print(f"goal: recommendation's loss <= best neighbour's + {GOAL_LOSS}: {rec['val_loss']:.3f} vs "
          f"{best_other:.3f} -> "
          f"{'met' if rec['val_loss'] <= best_other + GOAL_LOSS else 'NOT met'}")
    print(f"runs, MLflow store and experiment files in {folder}")


if __name__ == "__main__":
    main()
