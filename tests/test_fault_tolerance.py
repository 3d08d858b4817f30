"""A training worker killed for real (SIGKILL) mid-run: Ray restarts it, it resumes from the latest checkpoint, keeps
logging to the same MLflow run, and ends where an uninterrupted run ends. And `--resume` with a larger budget
continues a finished run in the same MLflow run.

Runs go through `fwray.run.run` in this process with the session's Ray; the experiment is the smoke experiment
shrunk (tests/pipeline.py: TINY); the uninterrupted reference is the session's shared `tiny_run`.
"""
import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fwray import config
from pipeline import ONE_WORKER, SMOKE, TINY, history, latest_run_dir, run_smoke, top_run, train_workers_under


def own_train_workers():
    """RayTrainWorker processes of this session's Ray cluster (other Ray clusters may run on the machine)."""
    import ray._private.worker as ray_worker

    return train_workers_under(ray_worker._global_node.all_processes["raylet"][0].process.pid)


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


def test_killed_worker_resumes_in_the_same_run(tiny_run, tmp_path, cache):
    killer = Killer(tmp_path / "runs")
    killer.start()
    try:
        exp, client = run_smoke(tmp_path, cache, [*TINY, *ONE_WORKER])
    finally:
        killer.stop.set()
        killer.join()
    assert killer.error is None, killer.error
    assert killer.killed, "the worker was never killed"

    run = top_run(client)  # one MLflow run, the one the run started with
    latest = json.loads((tmp_path / "runs" / "smoke.latest.json").read_text())
    assert run.info.run_id == latest["mlflow_run_id"] and run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["fwray.resumed_from_step"])
    assert 8 <= resumed_from < exp.train.max_iters and resumed_from % 8 == 0
    # the restarted worker went on logging into that run, up to the end
    val = history(client, run.info.run_id, "val_loss")
    assert sorted(val) == [0, 8, 16, 24]
    assert max(history(client, run.info.run_id, "train_loss")) == 24

    base_val = tiny_run["val"]  # the same run, uninterrupted
    # the same arithmetic in the same order (one worker, two micro-steps, on this CPU), so equal in practice; the
    # margin is for a restarted worker whose kernels split a sum over another number of threads
    assert abs(val[24] - base_val[24]) <= 1e-4, (val, base_val)
    assert "fwray.resumed_from_step" not in tiny_run["run"].data.tags


def test_resume_continues_the_same_mlflow_run(tiny_run, cache):
    """--resume with a larger train.max_iters continues the uninterrupted run (24 steps) to 32, in its MLflow run."""
    folder, first = tiny_run["folder"], tiny_run["run"]
    assert max(tiny_run["val"]) == 24

    exp, client = run_smoke(folder, cache, [*TINY, *ONE_WORKER, "train.max_iters=32"], resume=True)
    run = top_run(client)
    assert run.info.run_id == first.info.run_id  # the same MLflow run, no new one
    assert run.data.tags["fwray.resumed_from_step"] == "24"
    assert run.info.status == "FINISHED"
    val = history(client, run.info.run_id, "val_loss")
    assert sorted(val) == [0, 8, 16, 24, 32]  # metrics beyond the old max_iters
    assert max(history(client, run.info.run_id, "train_loss")) == 32
    assert val[32] < val[24]
    assert json.loads((latest_run_dir(folder) / "model" / "model_config.json").read_text())["step"] == 32


def test_resume_without_an_earlier_run_is_one_line(tmp_path, cache):
    from fwray import run as fwrun

    exp = config.load(SMOKE, [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                              f"resources.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(fwrun.ResumeError, match="--resume: no earlier run"):
        fwrun.run(exp, resume=True)


def test_split_smaller_than_a_window_stops_before_training_in_one_line(ray_session, tmp_path, cache, capsys):
    from fwray import run as fwrun

    rc = fwrun.main([str(SMOKE), "model.block_size=60000", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                     f"resources.storage_path={tmp_path / 'runs'}", f"data.cache_dir={cache}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fwray:")]
    assert rc == 2 and len(err) == 1, err
    # the training split's shard holds a window of 60,001 tokens; the 12 validation documents do not
    assert "the validation split got 12 of the data's 218 documents" in err[0]
    assert "fewer than one window of block_size + 1 = 60001" in err[0] and "lower model.block_size" in err[0]
    assert not list((tmp_path / "runs").glob("*/checkpoint_*"))  # no training started


def test_a_validation_split_without_documents_names_the_split_and_the_setting(ray_session, tmp_path, capsys):
    """experiments/4070.yaml on the 218-document smoke sample: val_fraction 0.005 sends no document to validation."""
    from fwray import run as fwrun

    rc = fwrun.main([str(SMOKE.with_name("4070.yaml")), f"data.paths=[{SMOKE.with_name('smoke-sample.parquet')}]",
                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"resources.storage_path={tmp_path / 'runs'}",
                     f"data.cache_dir={tmp_path / 'cache'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fwray:")]
    assert rc == 2 and len(err) == 1, err
    assert "4070.yaml: the validation split got 0 of the data's 218 documents" in err[0]
    assert "raise data.val_fraction (now 0.005" in err[0]


def test_a_workers_deterministic_error_is_not_retried(ray_session, tmp_path):
    """An fwray error inside the worker (here a validation split too small, which fwray.run would have caught
    first) ends the run at once with its own message and exit code; Ray's retries are for crashes."""
    from fwray.train import trainer

    exp = config.load(SMOKE, [*TINY, "resources.max_failures=3", f"resources.storage_path={tmp_path / 'runs'}"])
    tokens = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(tokens)
    (tmp_path / "short.bin").write_bytes(tokens.read_bytes()[:20])  # 10 tokens
    (tmp_path / "run").mkdir()
    job = trainer.TrainJob(exp=exp, train_files=(str(tokens),), val_files=(str(tmp_path / "short.bin"),),
                           tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_id="0" * 32,
                           run_dir=str(tmp_path / "run"))
    with pytest.raises(trainer.TrainingStopped, match="holds 10 tokens, fewer than block_size") as stopped:
        trainer.fit(job, "deterministic")
    assert stopped.value.exit_code == 2
