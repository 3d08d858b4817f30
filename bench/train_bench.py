"""Training throughput: fwray's engine against a baseline measured in the same run.

  python bench/train_bench.py --preset 124m --batch-size 12 --compile          # GPU: tokens/s, MFU, peak memory
  python bench/train_bench.py --preset 124m --batch-size 16 --memory-cap-gb 12 # the same under a 12 GB cap
  python bench/train_bench.py --ray                                            # CPU: Ray Train wrapper vs plain engine

The default baseline is nanoGPT's loss (full logits, one cross-entropy) in the same loop, so the ratio isolates what
fwray changes. The engine mode needs only torch (no ray, no mlflow): it runs on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken"))  # --ray: samples at each eval
from fwray import config  # noqa: E402
from fwray.core import engine, hardware, loader  # noqa: E402
from fwray.core.model import GPT, flops_per_token  # noqa: E402

PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "full": dict(n_layer=12, n_head=8, n_embd=512, block_size=1024),  # experiments/full.yaml's model
}


def experiment(args, **train) -> config.Experiment:
    # synthetic token files stand in for prepared data: no data section needed
    return config.Experiment(
        name="train-bench", model=config.ModelConfig(**PRESETS[args.preset]),
        train=config.TrainConfig(batch_size=args.batch_size, gradient_accumulation_steps=args.accum,
                                 max_iters=args.steps, eval_interval=10**9, eval_iters=1,
                                 log_interval=max(1, args.steps // 4), compile=args.compile, warmup_iters=2, **train),
        hardware=config.HardwareConfig(peak_tflops=args.peak_tflops))


def synthetic_shards(folder: Path, tokens: int) -> tuple[list[str], list[str]]:
    data = np.random.default_rng(0).integers(0, 50257, tokens, dtype=np.uint16)
    data.tofile(folder / "train.bin")
    data[: tokens // 10].tofile(folder / "val.bin")
    return [str(folder / "train.bin")], [str(folder / "val.bin")]


def nanogpt_loss(self: GPT, idx, targets=None):
    """nanoGPT's forward: the whole (B, T, vocab) logits, then one cross-entropy."""
    logits = self.lm_head(self.hidden(idx))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def time_engine(exp, device, files, warmup: int, steps: int, baseline: bool) -> dict:
    """tokens/s over `steps` optimizer steps after `warmup` steps, and peak memory."""
    original = GPT.forward
    if baseline:
        GPT.forward = nanogpt_loss
    try:
        eng = engine.Engine.build(exp.model, exp.train, device)
        batches = loader.Batches.from_files(*files, exp.model.block_size, batch_size=exp.train.batch_size, seed=0)
        for s in range(warmup):
            eng.step(s, lambda m, s=s: batches.train_batch(s, m))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for s in range(warmup, warmup + steps):
            loss, _ = eng.step(s, lambda m, s=s: batches.train_batch(s, m))
        loss.item()  # waits for the device
        seconds = time.perf_counter() - start
        eng.evaluate(batches.val_batch, 1)  # eval at the training micro-batch must fit too
        tok_s = steps * exp.tokens_per_step / seconds
        n = eng.raw_model.num_params()
        peak = hardware.peak_tflops(device, exp.hardware.peak_tflops)
        return {"tokens_per_s": tok_s, "mfu": hardware.mfu(tok_s, flops_per_token(exp.model, n), peak),
                **hardware.memory_stats(device)}
    except torch.OutOfMemoryError:
        return {"tokens_per_s": float("nan"), "oom": True}
    finally:
        GPT.forward = original
        if device.type == "cuda":
            torch.cuda.empty_cache()


def show(label: str, r: dict) -> None:
    if r.get("oom"):
        print(f"{label:<22} out of memory")
        return
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    mem = (f"{r['peak_alloc_gb']:.2f} / {r['peak_reserved_gb']:.2f} GB" if "peak_alloc_gb" in r else "n/a (CPU)")
    print(f"{label:<22} {r['tokens_per_s']:>12,.0f} tok/s   MFU {mfu:>6}   peak alloc/reserved {mem}")


def engine_mode(args) -> None:
    device = hardware.pick_device("auto")
    if args.memory_cap_gb and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb / total), device)
    exp = experiment(args)
    print(f"device {hardware.device_name(device)}; {args.preset} model, micro-batch {args.batch_size} x "
          f"{exp.model.block_size}, accumulation {args.accum}, compile {engine.compile_enabled(exp.train, device)}, "
          f"cap {args.memory_cap_gb or 'none'} GB")
    with tempfile.TemporaryDirectory() as tmp:
        files = synthetic_shards(Path(tmp), 2_000_000)
        ours = time_engine(exp, device, files, args.warmup, args.steps, baseline=False)
        show("fwray engine", ours)
        if not args.no_baseline:
            base = time_engine(exp, device, files, args.warmup, args.steps, baseline=True)
            show("nanoGPT-style loss", base)
            print(f"ratio fwray / baseline: {ours['tokens_per_s'] / base['tokens_per_s']:.3f}")


def ray_mode(args) -> None:
    """The same tiny config through Ray Train (TorchTrainer + MLflow logging) and the plain engine."""
    import ray

    from fwray import ray_session
    from fwray.tracking import store as tracking
    from fwray.train import trainer

    exp = experiment(args)
    exp = exp.with_changes("train", eval_interval=args.steps, log_interval=max(1, args.steps // 5))
    exp = exp.with_changes("resources", max_failures=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_files, val_files = synthetic_shards(tmp, 2_000_000)
        exp = exp.with_changes("resources", storage_path=str(tmp / "runs"))
        exp = exp.with_changes("tracking", uri=f"sqlite:///{tmp}/mlflow.db")
        client = tracking.connect(exp)
        run_id = tracking.start_run(client, exp, "train-bench", tags={})
        ray_session.start(num_cpus=2)  # before the plain run too: both run beside an idle Ray
        plain = engine.train(exp.model, exp.train, loader.Batches.from_files(train_files, val_files, exp.model.block_size,
                                                            batch_size=exp.train.batch_size, seed=exp.train.seed),
                             lambda *a: None, device=torch.device("cpu"))
        job = trainer.TrainJob(exp=exp, train_files=tuple(train_files), val_files=tuple(val_files),
                               tracking_uri=client.tracking_uri, run_id=run_id,
                               run_dir=str(tmp / "run"))
        (tmp / "run").mkdir()
        wrapped = trainer.fit(job, "train-bench")
        ray.shutdown()
    print(f"plain engine       {plain['tokens_per_s']:>10,.0f} tok/s")
    print(f"Ray Train wrapper  {wrapped['tokens_per_s']:>10,.0f} tok/s")
    print(f"ratio wrapper / plain: {wrapped['tokens_per_s'] / plain['tokens_per_s']:.3f}  (goal >= 0.97)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default=None, help="model size (default: 124m on GPU, tiny on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch (default 12 on GPU, 16 on CPU)")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 30 GPU, 40 CPU, 120 --ray)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default="auto", nargs="?",
                   const=True)
    p.add_argument("--memory-cap-gb", type=float, default=None, help="emulate a smaller card")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak-FLOPs table for MFU")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--ray", action="store_true", help="CPU mode: Ray Train wrapper vs plain engine")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.ray
    args.preset = args.preset or ("124m" if gpu else "tiny")
    args.batch_size = args.batch_size or (12 if gpu else 16)
    args.steps = args.steps or (30 if gpu else 120 if args.ray else 40)  # --ray: 40 steps swing the ratio by ~0.08
    ray_mode(args) if args.ray else engine_mode(args)


if __name__ == "__main__":
    main()
