"""The pure core imports and trains on a machine with torch but without ray or mlflow (GPU benchmarks run there)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = ["errors", "config", "core.tokens", "core.loader", "core.layers", "core.model", "core.hf", "core.hardware",
        "core.health", "core.memory", "core.engine", "probe.trial", "plan.figures", "probe.verdict", "core.checkpoint",
        "data.report", "core.bpb", "core.hellaswag", "sample", "eval", "export", "plan.scaling", "data.size",
        "plan.family", "plan.planner"]

SCRIPT = textwrap.dedent("""
    import importlib, sys, tempfile
    from pathlib import Path
    # None in sys.modules: every `import ray...` raises ImportError. psutil and nvidia-ml-py (pynvml) are fwray
    # dependencies that a machine with torch alone lacks too
    for name in ("ray", "mlflow", "psutil", "pynvml"):
        sys.modules[name] = None
    try:
        import ray  # noqa: F401
        raise SystemExit("the guard does not work: ray imported")
    except ImportError:
        pass

    modules = %(modules)r
    for m in modules:
        importlib.import_module("fwray." + m)

    import numpy as np
    import torch
    from fwray import config
    from fwray.core.engine import train
    from fwray.core.loader import Batches

    model = config.ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    train_config = config.TrainConfig(batch_size=2, max_iters=3, eval_interval=3, eval_iters=1, log_interval=1,
                                      compile=False)
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 2_000, dtype=np.uint16).tofile(folder / f"{split}.bin")
    batches = Batches.from_files([folder / "train.bin"], [folder / "val.bin"], 16, batch_size=2, seed=0)
    seen = []
    summary = train(model, train_config, batches, lambda step, metrics, state: seen.append(step), device=torch.device("cpu"),
                    train_tokens=10_000)
    assert seen == [0, 1, 2, 3, 3], seen
    assert summary["steps"] == 3 and summary["final_val_loss"] > 0
    from fwray.core.health import HealthSampler
    assert HealthSampler(torch.device("cpu")).sample() == {}  # no psutil: no figures, and no error
    loaded = sorted(k for k, v in sys.modules.items() if v is not None and k.split(".")[0] in ("ray", "mlflow"))
    assert not loaded, loaded
    print("PURE-OK", " ".join(modules))
""")


def test_pure_core_without_ray_or_mlflow():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT % {"modules": PURE}], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PURE-OK" in proc.stdout


def test_boundary_modules_do_need_ray():
    """The guard is real: a boundary module fails to import under it (so the pure test can fail)."""
    script = "import sys\nsys.modules['ray'] = None\nimport fwray.train.trainer\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr
