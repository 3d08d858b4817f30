"""A training worker killed for real (SIGKILL) mid-run: Ray restarts it, it resumes from the latest checkpoint, keeps
logging to the same MLflow run, and ends where an uninterrupted run ends. And `--resume` with a larger budget
continues a finished run in the same MLflow run.

Runs go through `fwray.run.run` in this process with the session's Ray; the experiment is the smoke experiment
shrunk (1 layer x 16 wide, 4 x 64 tokens a step) so that each run costs seconds of training, not minutes.
"""
import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from fwray import config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.batch_size=4", "train.eval_iters=2",
        "train.warmup_iters=2", "train.log_interval=4", "train.eval_interval=8", "train.max_iters=24"]


def run_experiment(folder: Path, cache: Path, overrides=(), resume=False):
    from fwray import run as fwrun

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    exp = config.load(SMOKE, [f"tracking.uri={uri}", f"resources.storage_path={folder / 'runs'}",
                              f"data.cache_dir={cache}", *TINY, *overrides])
    assert fwrun.run(exp, resume=resume) == 0
    return exp, MlflowClient(tracking_uri=uri)


def the_run(client):
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


def own_train_workers():
    """RayTrainWorker processes of this session's Ray cluster (other Ray clusters may run on the machine)."""
    import ray._private.worker as ray_worker

    raylet = ray_worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def registered_checkpoint(storage: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run (a checkpoint folder alone may not be one yet)."""
    for snap in glob.glob(str(storage / "*" / "checkpoint_manager_snapshot.json")):
        try:
            if json.loads(Path(snap).read_text()).get("latest_checkpoint_result"):
                return True
        except (OSError, ValueError):  # being written
            pass
    return False


class Killer(threading.Thread):
    """Waits until the run's first checkpoint is registered, then SIGKILLs its training worker."""

    def __init__(self, storage: Path):
        super().__init__(daemon=True)
        self.storage, self.killed, self.error = storage, [], None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                if registered_checkpoint(self.storage):
                    workers = own_train_workers()
                    if workers:
                        for p in workers:
                            os.kill(p.pid, signal.SIGKILL)
                            self.killed.append(p.pid)
                        return
                time.sleep(0.05)
        except Exception as e:  # surfaced by the test
            self.error = e


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "fwray-cache"


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory, cache):
    folder = tmp_path_factory.mktemp("uninterrupted")
    exp, client = run_experiment(folder, cache)
    return folder, exp, client


def test_killed_worker_resumes_in_the_same_run(uninterrupted, tmp_path, cache):
    _, exp, base_client = uninterrupted
    killer = Killer(tmp_path / "runs")
    killer.start()
    try:
        _, client = run_experiment(tmp_path, cache)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.error is None, killer.error
    assert killer.killed, "the worker was never killed"

    run = the_run(client)  # one MLflow run, the one the run started with
    latest = json.loads((tmp_path / "runs" / "smoke.latest.json").read_text())
    assert run.info.run_id == latest["mlflow_run_id"] and run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["fwray.resumed_from_step"])
    assert 8 <= resumed_from < exp.train.max_iters and resumed_from % 8 == 0
    # the restarted worker went on logging into that run, up to the end
    val = history(client, run.info.run_id, "val_loss")
    assert sorted(val) == [0, 8, 16, 24]
    assert max(history(client, run.info.run_id, "train_loss")) == 24

    base_val = history(base_client, the_run(base_client).info.run_id, "val_loss")
    assert abs(val[24] - base_val[24]) <= 1e-4, (val, base_val)
    assert "fwray.resumed_from_step" not in the_run(base_client).data.tags


def test_resume_continues_the_same_mlflow_run(uninterrupted, cache):
    """--resume with a larger train.max_iters continues the uninterrupted run (24 steps) to 32, in its MLflow run."""
    folder, _, client = uninterrupted
    first = the_run(client)
    assert max(history(client, first.info.run_id, "val_loss")) == 24

    exp, client = run_experiment(folder, cache, ["train.max_iters=32"], resume=True)
    run = the_run(client)
    assert run.info.run_id == first.info.run_id  # the same MLflow run, no new one
    assert run.data.tags["fwray.resumed_from_step"] == "24"
    assert run.info.status == "FINISHED"
    val = history(client, run.info.run_id, "val_loss")
    assert sorted(val) == [0, 8, 16, 24, 32]  # metrics beyond the old max_iters
    assert max(history(client, run.info.run_id, "train_loss")) == 32
    assert val[32] < val[24]
    run_dir = Path(json.loads((folder / "runs" / "smoke.latest.json").read_text())["run_dir"])
    assert json.loads((run_dir / "model" / "model_config.json").read_text())["step"] == 32


def test_resume_without_an_earlier_run_is_one_line(tmp_path, cache):
    from fwray import run as fwrun

    exp = config.load(SMOKE, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                              f"resources.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(fwrun.ResumeError, match="--resume: no earlier run"):
        fwrun.run(exp, resume=True)
