"""End-to-end runs shared between test files: `fwray.run.run` on the smoke experiment, in this process with the
session's Ray, everything it writes under one folder, MLflow in a sqlite store there."""
import functools
import shutil
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from fwray import config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
# the smoke experiment shrunk (1 layer x 16 wide, 4 x 32 tokens a micro-step) so that a run costs seconds of training,
# in the modern recipe (Muon, WSD, epoch sampling): the smoke run itself covers gpt2 with AdamW end to end
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=32", "model.recipe=modern",
        "train.batch_size=4", "train.eval_iters=4", "train.warmup_iters=2", "train.log_interval=4",
        "train.eval_interval=8", "train.max_iters=24"]
ONE_WORKER = ["resources.num_workers=1", "train.gradient_accumulation_steps=2"]  # 256 tokens a step
TWO_WORKERS = ["resources.num_workers=2", "train.gradient_accumulation_steps=1"]  # the same 256


@functools.cache
def _empty_store() -> Path:
    """An empty MLflow sqlite store, created (and migrated to MLflow's schema) by MLflow once in this process."""
    empty = Path(tempfile.mkdtemp(prefix="fwray-empty-store-")) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()
    return empty


def sqlite_store(path: Path) -> str:
    """The URI of the MLflow sqlite store at `path`, a copy of `_empty_store()` when there is none yet: creating one
    costs ~2.5 s, and the suite uses dozens."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), path)
    return f"sqlite:///{path}"


def run_smoke(folder: Path, cache: Path, overrides=(), resume=False):
    """fwray.run on the smoke experiment; returns (resolved experiment as loaded, MLflow client)."""
    from fwray import run as fwrun

    uri = sqlite_store(folder / "mlflow.db")
    # no registered MLflow model (~5 s a run): test_tracking's runs register and serve theirs
    exp = config.load(SMOKE, [f"tracking.uri={uri}", f"resources.storage_path={folder / 'runs'}",
                              f"data.cache_dir={cache}", "tracking.register_model=false", *overrides])
    assert fwrun.run(exp, resume=resume) == 0
    return exp, MlflowClient(tracking_uri=uri)


def top_run(client):
    """The experiment's one top-level run (anything else is nested under it)."""
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1, [r.info.run_name for r in top]
    return top[0]


def history(client, run_id, name):
    """{step: value}, the latest value logged at each step (a restarted worker logs some steps again)."""
    out = {}
    for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out
