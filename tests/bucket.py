"""The suite's one run on a cluster whose nodes share no disk (tests/conftest.py: `cluster_run`): `fwray.prepare`
onto moto's bucket (tests/s3server.py), then the tiny smoke run, 2 workers x 1 micro-step, one on each node of the
two-node cluster (tests/cluster.py), its checkpoints and final model on the bucket. tests/test_object_storage.py
reads what it left there; tests/test_workers.py compares it with the session's 1-worker `tiny_run`.
"""
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster import Cluster, fwray
from pipeline import TINY, TWO_WORKERS, history, sqlite_store, top_run
from s3server import BUCKET, S3Server

CACHE = f"s3://{BUCKET}/cache"
# the sample's 218 documents in 4 tokenizer tasks, for the cluster's 2 CPUs (tiny_run's cache is cut the same way, so
# both runs read the same windows: none crosses a shard)
ROWS = "data.rows_per_task=60"


def settings(folder: Path, runs: str) -> list[str]:
    """A run with its cache and its runs on the bucket, MLflow in a sqlite file of its own."""
    return [f"data.cache_dir={CACHE}", f"resources.storage_path=s3://{BUCKET}/{runs}", ROWS,
            f"tracking.uri={sqlite_store(folder / 'mlflow.db')}", "tracking.register_model=false", *TINY, *TWO_WORKERS]


def driver_env(s3_store: S3Server, folder: Path) -> dict[str, str]:
    """The command's machine: the store's address and keys, and a temp folder of its own (the run's local files)."""
    (folder / "tmp").mkdir(exist_ok=True)
    return {**s3_store.env(), "TMPDIR": str(folder / "tmp")}


def cluster_run(two_nodes: Cluster, s3_store: S3Server, folder: Path, yardstick: Path) -> dict:
    env = driver_env(s3_store, folder)
    start = time.perf_counter()
    prepared = fwray("fwray.prepare", [f"data.cache_dir={CACHE}", ROWS], two_nodes, env=env)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    also = [f"yardstick.path={yardstick}"]  # what a run compared with this one sets too
    trained = fwray("fwray.run", [*settings(folder, "reference"), *also], two_nodes, env=env)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    client = MlflowClient(tracking_uri=sqlite_store(folder / "mlflow.db"))
    run = top_run(client)
    print(f"prepare + reference run on the cluster: {time.perf_counter() - start:.0f} s")
    return {"folder": folder, "also": also, "prepared": prepared, "trained": trained, "client": client, "run": run,
            "val": history(client, run.info.run_id, "val_loss"),
            "yardstick": history(client, run.info.run_id, "yardstick_val_loss")}
