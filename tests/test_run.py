"""The smoke experiment end to end: Ray Data -> Ray Train -> MLflow, checked from MLflow alone.

The run goes through `fwray.run.run` in this process with the session's Ray (a subprocess would pay for a second
Ray start); MLflow is a real sqlite store in a temporary folder.

The smoke defaults train 80 steps, ~3.5 min of training on 2 busy CPU cores (~600 tokens/s); the suite runs the
same experiment with train.max_iters=40 (the loss has fallen by > 4 by then, so "falls by 2" still has a margin).
FWRAY_FULL_SMOKE=1 runs the exact defaults.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fwray import config
from fwray.config import ModelConfig
from fwray.model import GPT

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
FULL = os.environ.get("FWRAY_FULL_SMOKE") == "1"
SHORTER = [] if FULL else ["train.max_iters=40"]
MAX_ITERS = 80 if FULL else 40


def run_experiment(folder: Path, cache: Path, overrides=(), resume=False):
    """fwray.run on the smoke experiment with everything it writes under `folder`; returns (exp, tracking uri)."""
    from fwray import run as fwrun

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    exp = config.load(SMOKE, [f"tracking.uri={uri}", f"resources.storage_path={folder / 'runs'}",
                              f"data.cache_dir={cache}", *overrides])
    assert fwrun.run(exp, resume=resume) == 0
    return exp, uri


@pytest.fixture(scope="module")
def smoke(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smoke")
    exp, uri = run_experiment(folder, tmp_path_factory.getbasetemp() / "fwray-cache", SHORTER)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    return exp, client, runs, folder


def top_level(runs):
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_one_run_per_experiment(smoke):
    _, _, runs, _ = smoke
    parents = top_level(runs)
    assert len(parents) == 1
    # anything else in the experiment (the data preparation) is nested under that one run
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs if r not in parents)
    assert parents[0].info.status == "FINISHED"


def test_params(smoke):
    exp, _, runs, _ = smoke
    params = top_level(runs)[0].data.params
    assert params["model.n_layer"] == "2"
    assert params["train.batch_size"] == "16"
    assert params["train.max_iters"] == str(MAX_ITERS)
    assert int(params["plan.params"]) == 3_322_176  # 2 x 64 wide, vocab 50304, block 64
    # after the run: the measured speed beside the plan
    assert float(top_level(runs)[0].data.tags["fwray.outcome.measured_tokens_per_s"]) > 0


def test_metric_histories(smoke):
    exp, client, runs, _ = smoke
    run_id = top_level(runs)[0].info.run_id
    history = {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
               for name in ("train_loss", "val_loss", "lr", "tokens_per_s")}
    assert [s for s, _ in history["val_loss"]] == list(range(0, MAX_ITERS + 1, 20))
    for name in ("train_loss", "lr", "tokens_per_s"):
        assert [s for s, _ in history[name]] == list(range(10, MAX_ITERS + 1, 10)), name
    assert all(v > 0 for _, v in history["tokens_per_s"])
    assert history["lr"][-1][1] == pytest.approx(exp.train.min_lr, rel=0.1)  # decayed to about min_lr
    first, last = history["val_loss"][0][1], history["val_loss"][-1][1]
    assert last <= first - 2.0, history["val_loss"]


def test_artifacts_and_model_loads(smoke, tmp_path):
    exp, client, runs, _ = smoke
    run_id = top_level(runs)[0].info.run_id
    listed = {a.path for a in client.list_artifacts(run_id)}
    listed |= {a.path for a in client.list_artifacts(run_id, "data")}
    listed |= {a.path for a in client.list_artifacts(run_id, "model")}
    for path in ("config.yaml", "plan.txt", "data/manifest.json", "model/model.pt", "model/model_config.json"):
        assert path in listed, (path, sorted(listed))

    local = Path(client.download_artifacts(run_id, "model", str(tmp_path)))
    cfg = json.loads((local / "model_config.json").read_text())
    model = GPT(ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__}))
    state = torch.load(local / "model.pt", weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    assert cfg["n_layer"] == 2 and cfg["n_embd"] == 64 and cfg["step"] == MAX_ITERS
    # the logged config is the resolved experiment: it loads back
    cfg_path = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    loaded = config.from_dict(__import__("yaml").safe_load(cfg_path.read_text()))
    assert loaded.model == exp.model and loaded.train.max_iters == MAX_ITERS
    manifest = json.loads(Path(client.download_artifacts(run_id, "data/manifest.json", str(tmp_path))).read_text())
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["tokens"] > 0
    # and the final model's validation loss is the run's last
    last_val = client.get_metric_history(run_id, "val_loss")
    assert cfg["val_loss"] == pytest.approx(max(last_val, key=lambda m: m.step).value)
