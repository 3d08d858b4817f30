"""The gpt2 recipe against the modern one: the same parquet, model shape and token budget, through the real pipeline.

    python bench/recipe_bench.py --preset cpu                      # 2 x 120 steps on 2 CPU cores
    python bench/recipe_bench.py --preset gpu --data shard.parquet  # a 124M-class model, a few minutes on one GPU

Each recipe trains with `fwray.run` (Ray Data -> Ray Train -> MLflow in a temporary sqlite store); the validation loss
at every evaluation is read back from MLflow. Both runs see the same validation windows (they depend on the seed and
the split only), so their losses compare. Printed: each recipe's validation loss against tokens seen, and the ratio
*tokens the modern recipe needs to reach the gpt2 recipe's final validation loss / the gpt2 recipe's tokens*
(linear interpolation between evaluations; below 1 means modern gets there sooner), and the same ratio in training
time, from each run's measured tokens/s (the modern recipe's step costs more: an untied head and Muon's
orthogonalisation).

The cpu preset's shape (6 layers x 256 wide, block 128): the hidden matrices, the only ones Muon trains, hold
4.7M parameters beside 12.9M in each of the 50304-token embedding and head. A narrower model would be almost all
embedding, and the comparison would say little about the blocks the recipe changes; a wider one does not train
enough tokens on two cores in the time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
CORPUS = ROOT.parent / "shared" / "corpus" / "python-docs.parquet"

from mlflow.tracking import MlflowClient  # noqa: E402

from fwray import config, ray_session, run  # noqa: E402
from recipe_ablation import tokens_to_reach  # noqa: E402  (bench/, the script's folder, is on the path)

PRESETS = {
    "cpu": {"model": {"n_layer": 6, "n_head": 4, "n_embd": 256, "block_size": 128},
            "train": {"batch_size": 8, "gradient_accumulation_steps": 1, "max_iters": 120, "eval_interval": 20,
                      "eval_iters": 8, "log_interval": 20, "warmup_iters": 10, "compile": False},
            "data": {"val_fraction": 0.05}},
    "gpu": {"model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
            "train": {"batch_size": 16, "gradient_accumulation_steps": 2, "max_iters": 600, "eval_interval": 100,
                      "eval_iters": 20, "log_interval": 20, "warmup_iters": 30},
            "data": {"val_fraction": 0.005}},
}
# The gpt2 recipe keeps nanoGPT's settings: AdamW 6e-4 with cosine decay over the run, random windows. The modern
# recipe takes its own defaults (Muon for the hidden matrices, width-scaled AdamW rates, WSD, epoch sampling).
RECIPES = {
    "gpt2": {"model": {"recipe": "gpt2"}, "train": {"learning_rate": 6e-4, "min_lr": 6e-5}},
    "modern": {"model": {"recipe": "modern"}, "train": {}},
}


def experiment(preset: str, recipe: str, data: Path, folder: Path, steps: int | None) -> config.Experiment:
    p, r = PRESETS[preset], RECIPES[recipe]
    train = {**p["train"], **r["train"], **({"max_iters": steps} if steps else {})}
    return config.from_dict({
        "name": f"recipe-bench-{recipe}",
        "model": {**p["model"], **r["model"]},
        "train": train,
        "data": {**p["data"], "paths": [str(data)], "cache_dir": str(folder / "cache")},
        "resources": {"storage_path": str(folder / "runs"), "max_failures": 0},
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }, f"recipe_bench --preset {preset}")


def val_curve(exp: config.Experiment) -> tuple[list[tuple[int, float]], float]:
    """(tokens seen, validation loss) at every evaluation of the experiment's one run, and its measured training
    tokens/s (evaluations excluded)."""
    client = MlflowClient(tracking_uri=exp.tracking.uri)
    found = client.search_runs([client.get_experiment_by_name(exp.name).experiment_id],
                               "attributes.run_name LIKE 'recipe-bench-%'")
    history = client.get_metric_history(found[0].info.run_id, "val_loss")
    speed = float(found[0].data.tags.get("fwray.outcome.measured_tokens_per_s", "nan"))  # none below 2 log intervals
    return sorted((m.step * exp.tokens_per_step, m.value) for m in history), speed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--data", type=Path, default=CORPUS, help="a parquet in FineWeb's schema")
    p.add_argument("--steps", type=int, help="optimizer steps per recipe (default: the preset's)")
    args = p.parse_args()
    ray_session.start()
    curves, speeds, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in RECIPES:
            exp = experiment(args.preset, recipe, args.data.resolve(), Path(tmp), args.steps)
            start = time.perf_counter()
            run.run(exp)
            seconds[recipe] = time.perf_counter() - start
            curves[recipe], speeds[recipe] = val_curve(exp)
    print(f"\nrecipe_bench --preset {args.preset}: {args.data.name}, {exp.model.n_layer} layers x "
          f"{exp.model.n_embd} wide, block {exp.model.block_size}, {exp.tokens_per_step:,} tokens a step")
    print(f"{'tokens seen':>12} " + " ".join(f"{r:>10}" for r in curves))
    for i, (tokens, _) in enumerate(curves["gpt2"]):
        print(f"{tokens:>12,} " + " ".join(f"{c[i][1]:>10.4f}" for c in curves.values()))
    print("tokens/s     " + " ".join(f"{speeds[r]:>10,.0f}" for r in curves))
    print("wall time    " + " ".join(f"{seconds[r]:>9.0f}s" for r in curves))
    gpt2_tokens, gpt2_final = curves["gpt2"][-1]
    needed = tokens_to_reach(curves["modern"], gpt2_final)
    if needed is None:
        print(f"modern never reached the gpt2 recipe's final validation loss {gpt2_final:.4f} "
              f"(its own final: {curves['modern'][-1][1]:.4f})")
    else:
        print(f"modern reaches the gpt2 recipe's final validation loss {gpt2_final:.4f} after {needed:,.0f} tokens: "
              f"ratio {needed / gpt2_tokens:.2f} of the gpt2 recipe's {gpt2_tokens:,} tokens")
        time_ratio = (needed / speeds["modern"]) / (gpt2_tokens / speeds["gpt2"])
        print(f"in training time (at each run's measured tokens/s): {needed / speeds['modern']:,.0f} s against "
              f"{gpt2_tokens / speeds['gpt2']:,.0f} s, ratio {time_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
