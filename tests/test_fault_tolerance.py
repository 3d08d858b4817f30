"""The mistakes that stop a run before or during training end it in one line, and are not retried; `--resume` with
no earlier run is one of them. (A worker killed mid-run, and `--resume` continuing a finished run in its MLflow run
from a machine without its files, are the cluster's: tests/test_object_storage.py.)

Runs go through `fwray.run.run` in this process with the session's Ray; the experiment is the smoke experiment
shrunk (tests/pipeline.py: TINY).
"""

import numpy as np
import pytest

from fwray import config
from pipeline import SMOKE, TINY, sqlite_store


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
