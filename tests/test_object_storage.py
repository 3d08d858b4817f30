"""fwray on a Ray cluster whose nodes share no disk: the token cache, the checkpoints, the final model and --resume on
object storage (moto's S3 server, tests/s3server.py), on the suite's two-node cluster (tests/cluster.py). This is the
suite's one two-node training run (tests/bucket.py): it also carries what a cluster run must show (progress lines once
each, a training worker on each node, the MLflow run finished), and the suite's worker killed mid-run.

And each mistake a user can make with a bucket, one line before any work.
"""
import json
import re
import subprocess
import sys
import time
from collections import Counter

import pytest
from bucket import CACHE, RUNS, driver_env, objects, read_object, settings
from cluster import ROOT, SMOKE, clean_env, free_port, fwray
from pipeline import history, top_run
from s3server import BUCKET


def secrets_of(s3_store) -> list[str]:
    return [keys["AWS_SECRET_ACCESS_KEY"] for keys in s3_store.users.values()]


def test_prepare_and_train_on_two_nodes_sharing_no_disk(cluster_run, two_nodes, s3_store):
    prepared, trained, run = cluster_run["prepared"], cluster_run["trained"], cluster_run["run"]
    # the cache is on the bucket, whole: its manifest (written last) names every shard the tasks uploaded
    entry = re.search(rf"prepared ({re.escape(CACHE)}/[0-9a-f]{{16}})", prepared.stdout).group(1)
    key = entry.removeprefix(f"s3://{BUCKET}/")
    manifest = json.loads(read_object(s3_store, f"{key}/manifest.json"))
    shards = [f["name"] for split in manifest["splits"].values() for f in split["files"]]
    assert len(shards) >= 4 and set(shards) <= set(objects(s3_store, key)), (shards, objects(s3_store, key))
    assert f"prepare: cached {entry}" in trained.stderr  # the run trained on what the cluster prepared

    # each node fetched the shards to its own disk (its $TMPDIR) and trained on them
    for node in ("head", "worker"):
        fetched = {p.name for p in (two_nodes.root / node / "tmp").glob(f"fwray/node-cache/{entry[-16:]}/*.bin")}
        assert fetched == set(shards), (node, fetched)
        assert two_nodes.actor_logs(node, "RayTrainWorker"), f"no training worker ran on the {node} node"

    # progress lines: each once (workers of a `ray start` cluster get fwray's settings through the runtime_env), but
    # for what the restarted workers did again from their checkpoint on (from its evaluation)
    output = trained.stdout + trained.stderr
    resumed_from = int(run.data.tags["fwray.resumed_from_step"])
    lines = [m for m in re.findall(r"step +(\d+)/24 (\|[^\n]*)", output) if int(m[0]) < resumed_from]
    assert len(lines) >= 2, output[-3000:]
    assert not [line for line, n in Counter(lines).items() if n > 1], "a progress line printed more than once"
    assert len(re.findall(r"done: validation loss \d+\.\d+ -> \d+\.\d+ after 24 steps", trained.stdout)) == 1, \
        trained.stdout

    # checkpoints, the final model and what --resume reads: on the bucket
    latest = json.loads(read_object(s3_store, f"{RUNS}/smoke.latest.json"))
    ray_name = latest["ray_run_name"]
    stored = objects(s3_store, f"{RUNS}/{ray_name}")
    assert any(p.startswith("checkpoint_") for p in stored), stored
    model = json.loads(read_object(s3_store, f"{RUNS}/{ray_name}/model/model_config.json"))
    assert model["step"] == 24
    assert f"final model: s3://{BUCKET}/{RUNS}/{ray_name}/model" in trained.stdout

    # the MLflow run: finished, trained on the cluster's CPUs by 2 workers, the manifest logged, no secret anywhere
    assert run.info.status == "FINISHED" and run.info.run_id == latest["mlflow_run_id"]
    assert run.data.tags["fwray.device"] == "cpu" and run.data.params["resources.num_workers"] == "2"
    assert run.data.params["data.cache_dir"] == CACHE
    client = cluster_run["client"]
    assert "data/manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id, "data")]
    recorded = json.dumps([run.data.params, run.data.tags]) + prepared.stdout + prepared.stderr + output
    for path in (cluster_run["folder"] / "tmp").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".yaml"):
            recorded += path.read_text(errors="replace")
    for secret in secrets_of(s3_store):
        assert secret not in recorded


def test_a_worker_killed_mid_run_resumes_from_the_bucket(cluster_run, s3_store):
    """The cluster's run lost its worker-node training worker mid-run (tests/bucket.py: Killer); Ray Train restarted
    the workers from the last checkpoint it had registered in the bucket, and the run finished in its MLflow run."""
    assert cluster_run["kill_error"] is None, cluster_run["kill_error"]
    assert cluster_run["killed"], "no training worker was killed"
    run = cluster_run["run"]
    latest = json.loads(read_object(s3_store, f"{RUNS}/smoke.latest.json"))
    assert run.info.run_id == latest["mlflow_run_id"] and run.info.status == "FINISHED"  # one run, finished
    resumed_from = int(run.data.tags["fwray.resumed_from_step"])  # from a checkpoint Ray read back from the bucket
    assert 8 <= resumed_from < 24 and resumed_from % 8 == 0
    # the restarted workers went on logging into that run, up to the end
    assert sorted(cluster_run["val"]) == [0, 8, 16, 24]
    assert max(m.step for m in cluster_run["train_losses"]) == 24
    # the steps after the checkpoint, taken before the kill and again after it: the same arithmetic in the same order,
    # so equal in practice; the margin is for a restarted worker whose kernels split a sum over another number of
    # threads. (That the run as a whole lands where an uninterrupted one does: tests/test_workers.py.)
    losses: dict[int, list[float]] = {}
    for m in sorted(cluster_run["train_losses"], key=lambda m: m.timestamp):
        losses.setdefault(m.step, []).append(m.value)
    again = {step: values for step, values in losses.items() if len(values) > 1}
    assert again and min(again) > resumed_from, losses  # the killer waited for a loss logged past the checkpoint
    for step, (before, after) in again.items():
        assert abs(before - after) <= 1e-4, (step, before, after)


def test_resume_from_another_machine_after_the_run_ends(cluster_run, two_nodes, s3_store, tmp_path):
    """--resume with a larger budget, from a machine that has none of the run's files (another temp folder): what
    it reads is on the bucket."""
    folder = cluster_run["folder"]
    env = {**driver_env(s3_store, tmp_path), "TMPDIR": str(tmp_path / "tmp")}
    resumed = fwray("fwray.run", [*settings(folder, RUNS), *cluster_run["also"], "train.max_iters=32",
                                  "--resume"], two_nodes, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    run = top_run(cluster_run["client"])
    assert run.info.run_id == cluster_run["run"].info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["fwray.resumed_from_step"] == "24"
    val = history(cluster_run["client"], run.info.run_id, "val_loss")
    assert sorted(val) == [0, 8, 16, 24, 32] and val[32] < val[24]
    ray_name = json.loads(read_object(s3_store, f"{RUNS}/smoke.latest.json"))["ray_run_name"]
    assert json.loads(read_object(s3_store, f"{RUNS}/{ray_name}/model/model_config.json"))["step"] == 32

    # and the final model samples from the bucket
    model = f"s3://{BUCKET}/{RUNS}/{ray_name}/model"
    sampled = subprocess.run([sys.executable, "-m", "fwray.sample", "--checkpoint", model, "--max-new-tokens", "4"],
                             cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0 and sampled.stdout.startswith("The"), sampled.stderr[-3000:]


def test_a_node_fetches_each_shard_once_and_checks_it(s3_store, tmp_path, monkeypatch):
    import hashlib

    from fwray.storage.node_cache import ShardDamaged, local_files

    for k, v in s3_store.env().items():
        monkeypatch.setenv(k, v)
    data = bytes(range(256)) * 64
    with s3_store.filesystem().open_output_stream(f"{BUCKET}/node/0123456789abcdef/train-00000.bin") as f:
        f.write(data)
    shard = f"s3://{BUCKET}/node/0123456789abcdef/train-00000.bin"
    sha = {"train-00000.bin": hashlib.sha256(data).hexdigest()}
    local = tmp_path / "local.bin"
    local.write_bytes(b"")
    got = local_files((shard, str(local)), sha, str(tmp_path / "node"))
    assert got == [str(tmp_path / "node" / "0123456789abcdef" / "train-00000.bin"), str(local)]  # local stays
    assert open(got[0], "rb").read() == data
    s3_store.filesystem().delete_file(f"{BUCKET}/node/0123456789abcdef/train-00000.bin")
    assert local_files((shard,), sha, str(tmp_path / "node")) == got[:1]  # reused: the store is not asked again

    with pytest.raises(ShardDamaged, match="sha256"):  # a shard changed after its manifest was written
        with s3_store.filesystem().open_output_stream(f"{BUCKET}/node/fedcba9876543210/val-00000.bin") as f:
            f.write(b"changed")
        local_files((f"s3://{BUCKET}/node/fedcba9876543210/val-00000.bin",), {"val-00000.bin": sha["train-00000.bin"]},
                    str(tmp_path / "node"))
    assert not list((tmp_path / "node" / "fedcba9876543210").iterdir())  # nothing half-fetched left


# ---------------------------------------------------------------- mistakes: one line each, before any work


def one_error_line(proc: subprocess.CompletedProcess, s3_store) -> str:
    output = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fwray: error:")]
    assert proc.returncode != 0 and len(errors) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for secret in secrets_of(s3_store):
        assert secret not in output
    return errors[0]


@pytest.mark.parametrize("case, user, endpoint, cache, says", [
    ("missing bucket", "allowed", None, "s3://no-such-bucket/cache", "the bucket 'no-such-bucket' does not exist"),
    ("no credentials", None, None, CACHE, "no credentials found"),
    ("no permission", "denied", None, CACHE, "access denied"),
    ("refused credentials", "wrong", None, CACHE, "refused the credentials"),
    ("dead endpoint", "allowed", "dead", CACHE, "does not answer"),
])
def test_object_storage_mistakes_are_one_line(s3_store, tmp_path, case, user, endpoint, cache, says):
    env = s3_store.env(user if user != "wrong" else "allowed")
    if user == "wrong":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    if endpoint == "dead":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fwray.prepare", str(SMOKE), f"data.cache_dir={cache}"], cwd=ROOT,
                          env=clean_env(**env, TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=120)
    line = one_error_line(proc, s3_store)
    assert cache in line and says in line, line
    assert time.perf_counter() - start < 30  # bounded: seconds, not the SDK's minutes of retries
    assert "prepare:" not in proc.stderr  # nothing tokenized


def test_a_storage_path_that_is_a_file_is_one_line_before_the_data(s3_store, tmp_path):
    """Once a NotADirectoryError traceback after the data was prepared."""
    (tmp_path / "runs").write_text("not a folder")
    proc = subprocess.run([sys.executable, "-m", "fwray.run", str(SMOKE), f"resources.storage_path={tmp_path / 'runs'}",
                           f"data.cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    line = one_error_line(proc, s3_store)
    assert "resources.storage_path" in line and "is a file" in line, line
    assert not (tmp_path / "cache").exists()  # nothing prepared
