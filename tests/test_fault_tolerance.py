"""`--resume` with a larger budget continues a finished run in the same MLflow run; the mistakes that stop a run
before or during training end it in one line, and are not retried. (A worker killed mid-run is the cluster's:
tests/test_object_storage.py.)

Runs go through `fwray.run.run` in this process with the session's Ray; the experiment is the smoke experiment
shrunk (tests/pipeline.py: TINY); the finished run is the session's shared `tiny_run`.
"""
import json

import numpy as np
import pytest

from fwray import config
from pipeline import ONE_WORKER, SMOKE, TINY, history, latest_run_dir, run_smoke, sqlite_store, top_run


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

    exp = config.load(SMOKE, [f"tracking.uri={sqlite_store(tmp_path / 'mlflow.db')}",
                              f"resources.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(fwrun.ResumeError, match="--resume: no earlier run"):
        fwrun.run(exp, resume=True)


def test_split_smaller_than_a_window_stops_before_training_in_one_line(ray_session, tmp_path, cache, capsys):
    from fwray import run as fwrun

    rc = fwrun.main([str(SMOKE), "model.block_size=60000", f"tracking.uri={sqlite_store(tmp_path / 'mlflow.db')}",
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
                     f"tracking.uri={sqlite_store(tmp_path / 'mlflow.db')}",
                     f"resources.storage_path={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}"])
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
                           tracking_uri=sqlite_store(tmp_path / 'mlflow.db'), run_id="0" * 32,
                           run_dir=str(tmp_path / "run"))
    with pytest.raises(trainer.TrainingStopped, match="holds 10 tokens, fewer than block_size") as stopped:
        trainer.fit(job, "deterministic")
    assert stopped.value.exit_code == 2
