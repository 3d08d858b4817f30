"""The recipes and each new switch, through the core alone (the Engine on token files; no Ray, no MLflow): what a GPU
machine with torch only can run.

    python bench/recipe_ablation.py                                  # cpu preset: 9 arms x 2 seeds on 2 CPU cores
    python bench/recipe_ablation.py --preset gpu --tokens DIR        # 124M-class shapes on one GPU

Arms: the gpt2 recipe (nanoGPT's AdamW 6e-4 and cosine), the modern recipe, modern plus one switch of the speedrun
recipe each (the cpu preset's), and the speedrun recipe (every switch at its default; the gpu preset's, with gpt2 and
modern). +doc_mask (modern with attention kept within each document), +attn_window (a sliding window of half the block),
+warmup_0 (no warmup) and +muon_lr_0.05 are in no preset's arms: ask for them with `--arms
modern,+doc_mask,+attn_window,+warmup_0,+muon_lr_0.05`. Every arm trains the same shape for the same steps on the same
tokens; within a seed, every arm starts from the same random state and evaluates the same validation windows. Printed:
each arm's validation loss against tokens seen and against training seconds (from its measured tokens/s, evaluations
excluded); the tokens (and seconds) each arm needs to reach the gpt2 recipe's final validation loss of the same seed, as
a share of gpt2's; and each switch's final loss against modern's, kept only if it is not worse beyond the two seeds'
spread.

Token files: --data's parquet files, tokenized with fwray.core.tokens and split by document id as fwray.prepare does,
written as train.bin and val.bin under --tokens (reused when there: tokenize here, carry the folder to a GPU machine).

The cpu preset: 4 layers x 128 wide, block 128, 50 steps of 8 x 128 tokens per arm. The 50304-token embedding and
head (6.4M parameters each, beside 0.8M in the blocks) make most of a step's cost at any width a CPU can afford:
this shape is what lets the runs fit in minutes (an arm ~42 s on 2 cores, all 18 in under 15 minutes; at
--steps 100 an arm takes ~85 s and all 18 ~26 minutes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("FWRAY_SHARED", ROOT.parent / "shared"))  # a checkout elsewhere names it
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
CORPUS = SHARED / "corpus"

from fwray.config import RECIPE_TRAINING, ModelConfig, TrainConfig  # noqa: E402
from fwray.core.engine import train  # noqa: E402
from fwray.core.hardware import pick_device  # noqa: E402
from fwray.core.loader import Batches  # noqa: E402
from fwray.core.tokens import encode_documents, get_tokenizer, is_validation  # noqa: E402

PRESETS = {
    "cpu": {"model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
            "train": {"batch_size": 8, "max_iters": 50, "eval_interval": 10, "eval_iters": 2, "eval_batch_size": 16,
                      "log_interval": 10, "warmup_iters": 10, "compile": False},
            "data": [CORPUS / "python-docs.parquet"], "seeds": (1337, 1338),
            "arms": "gpt2,modern,+split_qkv,+embed_norm,+momentum_warmup,+muon_wd_0,+decay_0.5,+value_embeds,"
                    "+unet_skips"},
    "gpu": {"model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
            "train": {"batch_size": 32, "max_iters": 600, "eval_interval": 100, "eval_iters": 20,
                      "log_interval": 50, "warmup_iters": 30},
            "data": [CORPUS / "debian-docs.parquet", CORPUS / "python-docs.parquet"],
            "arms": "gpt2,modern,speedrun", "seeds": (1337,)},
}
VAL_FRACTION = 0.05
# name -> (recipe, model switches, train keys); a recipe's training defaults (config.RECIPE_TRAINING) apply under
# what an arm sets
ARMS = {
    "gpt2": ("gpt2", {}, {"learning_rate": 6e-4, "min_lr": 6e-5}),
    "modern": ("modern", {}, {}),
    "+split_qkv": ("modern", {}, {"muon_split_qkv": True}),
    "+embed_norm": ("modern", {"embed_norm": True}, {}),
    "+momentum_warmup": ("modern", {}, {"muon_momentum_warmup": 300}),
    "+muon_wd_0": ("modern", {}, {"muon_weight_decay": 0.0}),
    "+decay_0.5": ("modern", {}, {"decay_fraction": 0.5}),
    # the references warm the rate up 0-40 steps (the preset: 10 of 50) and run Muon at 0.02 (nanochat) or 0.05
    # (modded-nanogpt)
    "+warmup_0": ("modern", {}, {"warmup_iters": 0}),
    "+muon_lr_0.05": ("modern", {}, {"muon_lr": 0.05}),
    # a table for a quarter of the layers, at both ends (modded-nanogpt's 3 in 12): 1 in the cpu preset's 4
    "+value_embeds": ("modern", {"value_embeds": lambda model: max(1, model["n_layer"] // 4)}, {}),
    "+unet_skips": ("modern", {"unet_skips": True}, {}),
    "+doc_mask": ("modern", {"doc_mask": True}, {}),  # FlexAttention where compiled on CUDA, dense SDPA on a CPU
    # a sliding window half the block (as doc_mask: FlexAttention where compiled on CUDA, dense SDPA on a CPU)
    "+attn_window": ("modern", {"attn_window": lambda model: model["block_size"] // 2}, {}),
    "speedrun": ("speedrun", {}, {}),
}


def token_files(parquets: list[Path], folder: Path) -> dict[str, Path]:
    """train.bin and val.bin (uint16, EOT before each document) under `folder`, tokenized once."""
    files = {split: folder / f"{split}.bin" for split in ("train", "val")}
    if all(f.exists() for f in files.values()):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    enc = get_tokenizer("gpt2")
    docs = {"train": [], "val": []}
    for path in parquets:
        table = pq.read_table(path, columns=["text", "id"])
        for text, doc_id in zip(table.column("text").to_pylist(), table.column("id").to_pylist()):
            docs["val" if is_validation(doc_id, VAL_FRACTION) else "train"].append(text)
    for split, texts in docs.items():
        tokens, _ = encode_documents(enc, texts)
        tokens.tofile(files[split].with_suffix(".tmp"))
        files[split].with_suffix(".tmp").rename(files[split])
    return files


def configs(preset: dict, arm: str, seed: int) -> tuple[ModelConfig, TrainConfig]:
    recipe, model, changes = ARMS[arm]
    model = {k: v(preset["model"]) if callable(v) else v for k, v in model.items()}  # a switch sized by the shape
    defaults = RECIPE_TRAINING[recipe].get("train", {})
    t = {**defaults, **preset["train"], **changes, "seed": seed}
    t["lr_decay_iters"] = t["max_iters"]
    return ModelConfig(**preset["model"], recipe=recipe, **model), TrainConfig(**t)


def run_arm(preset: dict, arm: str, seed: int, files: dict[str, Path], device: torch.device) -> dict:
    """One training run: its (tokens seen, validation loss) at every evaluation and its tokens/s."""
    model, t = configs(preset, arm, seed)
    sampling = RECIPE_TRAINING[ARMS[arm][0]].get("data", {}).get("sampling", "random")
    batches = Batches.from_files([files["train"]], [files["val"]], model.block_size, batch_size=t.batch_size,
                                 seed=seed, eval_batch_size=t.eval_batch_size, sampling=sampling)
    curve = []

    def report(step, metrics, state):
        if "val_loss" in metrics:
            curve.append((metrics["tokens_seen"], metrics["val_loss"]))

    summary = train(model, t, batches, report, device=device)
    # measured tokens/s leaves out evaluations and the first log interval (warm-up, compilation); a run too short
    # to have a second one falls back to its wall time
    tokens_per_s = summary["tokens_per_s"] or curve[-1][0] / summary["seconds"]
    return {"curve": curve, "tokens_per_s": tokens_per_s, "wall_s": summary["seconds"]}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` (interpolated between evaluations); None if it never does."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


def share_of_gpt2(runs: dict[str, dict[int, dict]], arm: str, seed: int) -> tuple[float, float] | None:
    """(tokens, seconds) the arm needs to reach the gpt2 recipe's final validation loss of the same seed, as shares of
    gpt2's own; None if it never gets there."""
    if "gpt2" not in runs:  # the yardstick was not run
        return None
    gpt2_tokens, gpt2_final = runs["gpt2"][seed]["curve"][-1]
    needed = tokens_to_reach(runs[arm][seed]["curve"], gpt2_final)
    if needed is None:
        return None
    seconds = needed / runs[arm][seed]["tokens_per_s"]
    return needed / gpt2_tokens, seconds / (gpt2_tokens / runs["gpt2"][seed]["tokens_per_s"])


def report_table(runs: dict[str, dict[int, dict]], seeds: tuple[int, ...]) -> None:
    arms, mean = list(runs), statistics.fmean
    final = {arm: [runs[arm][s]["curve"][-1][1] for s in seeds] for arm in arms}
    print(f"\nvalidation loss (mean of {len(seeds)} seed(s)) against tokens seen")
    print(f"{'tokens':>9} " + " ".join(f"{a:>16}" for a in arms))
    for i, (tokens, _) in enumerate(runs[arms[0]][seeds[0]]["curve"]):
        print(f"{tokens:>9,} " + " ".join(f"{mean(runs[a][s]['curve'][i][1] for s in seeds):>16.4f}" for a in arms))
    print(f"{'seconds':>9} " + " ".join(f"{mean(r[s]['curve'][-1][0] / r[s]['tokens_per_s'] for s in seeds):>15.1f}s"
                                        for r in runs.values()) + "   (training time of the whole run)")

    print("\nfinal validation loss per seed, its mean against modern's, and the tokens and seconds to reach the gpt2 "
          "recipe's final loss as a share of gpt2's (mean over seeds; - : not reached in every seed)")
    print(f"{'arm':>17} {'final per seed':>22} {'vs modern':>10} {'tokens x':>9} {'seconds x':>10} {'tok/s':>8}")
    for arm in arms:
        shares = [share_of_gpt2(runs, arm, s) for s in seeds]
        reached = None not in shares
        tokens_x = f"{mean(x[0] for x in shares):.2f}" if reached else "-"
        seconds_x = f"{mean(x[1] for x in shares):.2f}" if reached else "-"
        delta = f"{mean(final[arm]) - mean(final['modern']):+.4f}" if "modern" in final else "-"
        print(f"{arm:>17} {' '.join(f'{v:.4f}' for v in final[arm]):>22} {delta:>10} {tokens_x:>9} {seconds_x:>10} "
              f"{mean(runs[arm][s]['tokens_per_s'] for s in seeds):>8,.0f}")
    if "modern" in final and len(seeds) > 1:
        spread = max(final["modern"]) - min(final["modern"])
        print(f"\nmodern's spread between seeds: {spread:.4f}; a switch is a default where its mean final loss is not "
              f"above modern's by more:")
        for arm in arms:
            if arm.startswith("+"):
                delta = mean(final[arm]) - mean(final["modern"])
                print(f"  {arm}: {delta:+.4f} -> {'not worse' if delta <= spread else 'worse: not a default'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--data", type=Path, nargs="+", help="parquet files in FineWeb's schema (default: the preset's)")
    p.add_argument("--tokens", type=Path, help="folder of train.bin / val.bin, made here when absent "
                                               "(default: a temporary one)")
    p.add_argument("--arms", help=f"comma-separated, of {', '.join(ARMS)} (default: the preset's; without gpt2, "
                                  "no shares of gpt2's tokens)")
    p.add_argument("--seeds", type=int, nargs="+", help="default: the preset's")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (default: the preset's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = p.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["train"] = {**preset["train"], "max_iters": args.steps}
    arms = (args.arms or preset["arms"]).split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}", file=sys.stderr)
        return 2
    seeds = tuple(args.seeds or preset["seeds"])
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = token_files(args.data or preset["data"], args.tokens or Path(tmp))
        n_train = os.path.getsize(files["train"]) // 2
        print(f"tokens: {n_train:,} train, {os.path.getsize(files['val']) // 2:,} val "
              f"({time.perf_counter() - start:.0f} s); device {device}; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs", flush=True)
        runs: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
        for seed in seeds:
            for arm in arms:
                runs[arm][seed] = run_arm(preset, arm, seed, files, device)
                r = runs[arm][seed]
                print(f"{arm:>17} seed {seed}: {r['tokens_per_s']:,.0f} tok/s, {r['wall_s']:.0f} s, load average "
                      f"{os.getloadavg()[0]:.1f}; val loss {' '.join(f'{v:.4f}' for _, v in r['curve'])}", flush=True)
    m, t = configs(preset, arms[0], seeds[0])
    print(f"\nrecipe_ablation --preset {args.preset}: {m.n_layer} layers x {m.n_embd} wide, block {m.block_size}, "
          f"{t.batch_size * m.block_size:,} tokens a step, {t.max_iters} steps, seeds {', '.join(map(str, seeds))}; "
          f"{time.perf_counter() - start:.0f} s in all")
    report_table(runs, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
