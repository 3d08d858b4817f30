"""Shared fixtures: one local Ray per test session (ray.init costs ~10 s here), the corpus, tiktoken's cache."""
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FWRAY_SHARED", ROOT.parent / "shared"))  # a checkout elsewhere names it
CORPUS = SHARED / "corpus" / "python-docs.parquet"
SMOKE = ROOT / "experiments" / "smoke.yaml"

# the suite runs on two xdist workers (below): one compute thread each, and in everything they start (Ray's workers,
# subprocesses), or two 2-thread pools on two cores spend their time waiting for each other
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
# absolute: tests start fwray in other working directories, and the README's command sets a relative path
os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
import fwray.ray_session  # noqa: E402,F401  (Ray's environment, as fwray sets it, before the session's Ray starts)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # fwray's own start: a private Ray (never one that happens to run here) unless RAY_ADDRESS names a cluster
    fwray.ray_session.start(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus() -> Path:
    assert CORPUS.is_file(), f"the shared corpus is missing at {CORPUS}"
    return CORPUS


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One token cache for every end-to-end run of the smoke experiment."""
    return tmp_path_factory.getbasetemp() / "fwray-cache"


@pytest.fixture(scope="session")
def yardstick_file(tmp_path_factory, corpus) -> Path:
    """A small yardstick in llm.c's format: 4,000 real tokens of documents the smoke experiment never trains on."""
    from llmc import corpus_tokens, write_llmc

    return write_llmc(tmp_path_factory.mktemp("yardstick") / "python_docs_val.bin", corpus_tokens(corpus, 5)[:4000])


@pytest.fixture(scope="session")
def tiny_run(request, tmp_path_factory, worker_id) -> dict:
    """The tiny smoke run, 1 worker x 2 micro-steps, 24 steps, with a yardstick: what the cluster's 2-worker run is
    compared with. Made once a session, by the first xdist worker that asks for it (the others wait for it under a
    file lock); its figures and its MLflow run are read when it ends."""
    from filelock import FileLock
    from mlflow.entities import Run
    from mlflow.protos.service_pb2 import Run as RunProto
    from mlflow.tracking import MlflowClient

    from bucket import ROWS
    from pipeline import ONE_WORKER, TINY, history, run_smoke, top_run

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # the folder above every worker's own
    record = shared / "tiny-run.json"
    with FileLock(shared / "tiny-run.lock"):
        if not record.exists():
            request.getfixturevalue("ray_session")
            folder, yardstick = tmp_path_factory.mktemp("tiny-run"), request.getfixturevalue("yardstick_file")
            _, client = run_smoke(folder, request.getfixturevalue("cache"),
                                  [*TINY, *ONE_WORKER, ROWS, f"yardstick.path={yardstick}"])
            run = top_run(client)
            record.write_text(json.dumps({
                "folder": str(folder), "uri": client.tracking_uri, "yardstick_file": str(yardstick),
                "run": run.to_proto().SerializeToString().hex(),
                "val": history(client, run.info.run_id, "val_loss"),
                "yardstick": history(client, run.info.run_id, "yardstick_val_loss")}))
    made = json.loads(record.read_text())
    return {"folder": Path(made["folder"]), "client": MlflowClient(tracking_uri=made["uri"]),
            "run": Run.from_proto(RunProto.FromString(bytes.fromhex(made["run"]))),
            "yardstick_file": Path(made["yardstick_file"]),
            **{name: {int(step): v for step, v in made[name].items()} for name in ("val", "yardstick")}}


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """An S3-compatible store on 127.0.0.1 with IAM on (tests/s3server.py)."""
    from s3server import S3Server

    store = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield store
    store.stop()


@pytest.fixture(scope="session")
def two_nodes(s3_store):
    """The suite's one two-node Ray cluster (tests/cluster.py); its nodes hold the store's allowed keys, as cloud nodes
    would hold theirs in their environment or profile."""
    from cluster import Cluster

    cluster = Cluster(env=s3_store.users["allowed"])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def cluster_run(two_nodes, s3_store, tmp_path_factory, yardstick_file) -> dict:
    """The tiny smoke run on the two-node cluster, 2 workers, cache and checkpoints on the bucket, a worker killed
    mid-run (tests/bucket.py)."""
    from bucket import cluster_run

    return cluster_run(two_nodes, s3_store, tmp_path_factory.mktemp("cluster-run"), yardstick_file)


# The suite runs on two xdist workers (pyproject's addopts: -n 2 --dist loadgroup). A group runs whole on one worker:
# each module is a group, so its module fixtures are built once, except that the modules using the two-node cluster
# are one group, so the cluster and its run are made once (`tiny_run` is made once by a file lock instead). The groups
# that take longest start first (--no-loadscope-reorder keeps this order), so neither worker is left with a long one
# at the end; the health module, first on the other worker, makes `tiny_run` before the cluster group wants it.
SHARED_RUNS = ("two_nodes", "cluster_run")
SHARED_GROUP = "cluster"
LONGEST_FIRST = (SHARED_GROUP, "test_health", "test_tracking", "test_probe", "test_gpu_check", "test_fault_tolerance")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    modules: dict[str, str] = {}
    for item in items:
        module = Path(item.fspath).stem
        if any(f in item.fixturenames for f in SHARED_RUNS):
            modules[module] = SHARED_GROUP
        modules.setdefault(module, module)
    group = {item: modules[Path(item.fspath).stem] for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item]))
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group[item], len(rank)))  # stable: a module's own order is kept
