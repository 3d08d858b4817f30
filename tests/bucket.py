"""The suite's one run on a cluster whose nodes share no disk (tests/conftest.py: `cluster_run`): `fwray.prepare`
onto moto's bucket (tests/s3server.py), then the tiny smoke run, 2 workers x 1 micro-step, one on each node of the
two-node cluster (tests/cluster.py), its checkpoints and final model on the bucket. Mid-run its training worker on the
worker node is SIGKILLed; Ray Train restarts the workers from the last checkpoint in the bucket and the run goes on.
tests/test_object_storage.py reads what it left there; tests/test_workers.py compares it with the session's 1-worker
`tiny_run`.
"""
import json
import signal
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cluster import Cluster, fwray
from pipeline import TINY, TWO_WORKERS, history, sqlite_store, top_run
from s3server import BUCKET, S3Server

CACHE = f"s3://{BUCKET}/cache"
RUNS = "reference"  # the run's folder in the bucket
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


def objects(s3_store: S3Server, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = s3_store.filesystem().get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True,
                                                                   allow_not_found=True))
    return [i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == pafs.FileType.File]


def read_object(s3_store: S3Server, key: str) -> bytes:
    with s3_store.filesystem().open_input_stream(f"{BUCKET}/{key}") as f:
        return f.read()


class Killer(threading.Thread):
    """SIGKILLs the training worker on the worker node once Ray Train has registered a checkpoint in the bucket and
    the run has logged a training loss past that checkpoint's step: the restarted workers compute those steps again,
    and their losses must come out as they did the first time."""

    def __init__(self, two_nodes: Cluster, s3_store: S3Server, tracking_uri: str):
        super().__init__(daemon=True)
        self.two_nodes, self.s3_store, self.client = two_nodes, s3_store, MlflowClient(tracking_uri=tracking_uri)
        self.killed, self.error, self.stop = [], None, threading.Event()

    def checkpoint_step(self) -> int | None:
        """The step of the latest checkpoint Ray Train has registered (its snapshot in the bucket), if any."""
        for key in objects(self.s3_store, RUNS):
            if key.endswith("checkpoint_manager_snapshot.json"):
                try:
                    latest = json.loads(read_object(self.s3_store, f"{RUNS}/{key}")).get("latest_checkpoint_result")
                except (OSError, ValueError):
                    continue
                if latest:
                    return latest["metrics"]["step"]
        return None

    def last_logged_step(self) -> int:
        experiment = self.client.get_experiment_by_name("smoke")
        if experiment is None:
            return -1
        runs = self.client.search_runs([experiment.experiment_id])
        steps = [m.step for r in runs for m in self.client.get_metric_history(r.info.run_id, "train_loss")]
        return max(steps, default=-1)

    def run(self):
        try:
            while not self.stop.is_set():
                step = self.checkpoint_step()
                if step is not None and self.last_logged_step() > step:
                    for p in self.two_nodes.train_workers("worker"):
                        p.send_signal(signal.SIGKILL)
                        self.killed.append(p.pid)
                    if self.killed:
                        return
                time.sleep(0.1)
        except Exception as e:  # surfaced by the test
            self.error = e


def cluster_run(two_nodes: Cluster, s3_store: S3Server, folder: Path, yardstick: Path) -> dict:
    env = driver_env(s3_store, folder)
    start = time.perf_counter()
    prepared = fwray("fwray.prepare", [f"data.cache_dir={CACHE}", ROWS], two_nodes, env=env)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    also = [f"yardstick.path={yardstick}"]  # what a run that continues this one sets too
    killer = Killer(two_nodes, s3_store, sqlite_store(folder / "mlflow.db"))
    killer.start()
    try:
        trained = fwray("fwray.run", [*settings(folder, RUNS), *also], two_nodes, env=env)
    finally:
        killer.stop.set()
        killer.join()
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    client = MlflowClient(tracking_uri=sqlite_store(folder / "mlflow.db"))
    run = top_run(client)
    print(f"prepare + run on the cluster, a worker killed: {time.perf_counter() - start:.0f} s")
    return {"folder": folder, "also": also, "prepared": prepared, "trained": trained, "client": client, "run": run,
            "killed": killer.killed, "kill_error": killer.error,
            "train_losses": client.get_metric_history(run.info.run_id, "train_loss"),
            "val": history(client, run.info.run_id, "val_loss"),
            "yardstick": history(client, run.info.run_id, "yardstick_val_loss")}
