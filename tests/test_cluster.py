"""fwray on a real two-node Ray cluster, and the ways joining one fails.

The cluster is two `ray start --block` processes on this machine (a head and a worker node, one CPU each, token
authentication with a token file of their own, each node with its own --temp-dir), so the pytest session's Ray and
any other Ray here are never touched. It is stopped by signalling those two processes and then, by pid, whatever
they started: `ray stop` would stop every Ray on the machine.
"""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from fwray import ray_session

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"  # as tests/conftest.py: tiktoken's files, absolute for the subprocesses
SMOKE = ROOT / "experiments" / "smoke.yaml"

TINY = ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "train.batch_size=4", "train.max_iters=4",
        "train.warmup_iters=1", "train.eval_interval=4", "train.log_interval=2", "train.eval_iters=2"]
NODE_START_S = 120
STOP_GRACE_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address, token setting or fwray-set Ray variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken"), PYTHONUNBUFFERED="1",
               **extra)
    return env


# ---------------------------------------------------------------- pure: the GPU decision


@pytest.mark.parametrize("setting, gpus, expected", [
    ("auto", 0, False), ("auto", 1, True), ("auto", 4, True), (False, 0, False), (False, 2, False), (True, 1, True),
    ("auto", 0.5, False),  # a fraction of a GPU is not a GPU for a training worker
])
def test_gpu_decision(setting, gpus, expected):
    assert ray_session.gpu_decision(setting, gpus) is expected


def test_gpu_required_but_the_cluster_has_none():
    with pytest.raises(ray_session.GpuUnavailable) as e:
        ray_session.gpu_decision(True, 0, "8 CPUs, 0 GPUs on 2 nodes")
    message = str(e.value)
    assert "\n" not in message and "8 CPUs, 0 GPUs on 2 nodes" in message
    assert "resources.use_gpu: auto or false" in message and "GPU node" in message
    assert isinstance(e.value, ray_session.FwrayError)


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("local", None),
                                             (" 10.0.0.1:6379 ", "10.0.0.1:6379"), ("auto", "auto"),
                                             ("ray://h:10001", "ray://h:10001")])
def test_cluster_address_only_when_asked(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", value)
    assert ray_session.cluster_address() == expected


def test_address_without_a_port_is_one_line():
    with pytest.raises(ray_session.RayUnavailable, match=r"has no port: write host:port"):
        ray_session.check_cluster("10.0.0.1")


# ---------------------------------------------------------------- a dead address: one line, within seconds


def test_dead_address_fails_fast_in_one_line(tmp_path):
    dead = free_port()  # bound, then closed: nothing listens there
    env = clean_env(RAY_ADDRESS=f"127.0.0.1:{dead}")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fwray.prepare", str(SMOKE), f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - start
    assert proc.returncode != 0 and took < 15, (took, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fwray: error:")]
    assert len(errors) == 1, proc.stderr
    assert f"127.0.0.1:{dead}" in errors[0] and "ray start --head" in errors[0] and "unset RAY_ADDRESS" in errors[0]


@pytest.fixture
def stale_ray_tmpdir():
    """A Ray temp folder (RAY_TMPDIR) whose ray_current_cluster names a cluster that is gone, as a crashed
    `ray start` leaves /tmp/ray/ray_current_cluster behind. Short: Ray's sockets go there."""
    root = Path(tempfile.mkdtemp(prefix="fwt", dir="/tmp"))
    (root / "ray").mkdir()
    (root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_stale_cluster_file_is_never_joined(stale_ray_tmpdir, tmp_path):
    """Without RAY_ADDRESS fwray starts its own Ray: plain ray.init() would try the stale address for minutes."""
    env = clean_env(RAY_TMPDIR=str(stale_ray_tmpdir))
    proc = subprocess.run([sys.executable, "-m", "fwray.prepare", str(SMOKE), f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepared " in proc.stdout


def test_auto_with_a_stale_cluster_file_fails_fast(stale_ray_tmpdir, tmp_path):
    env = clean_env(RAY_TMPDIR=str(stale_ray_tmpdir), RAY_ADDRESS="auto")
    proc = subprocess.run([sys.executable, "-m", "fwray.prepare", str(SMOKE), f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fwray: error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "stale" in errors[0] and "RAY_ADDRESS=auto" in errors[0]


# ---------------------------------------------------------------- a real two-node cluster


class Cluster:
    """A head and a worker node, each a `ray start --block` process in its own session."""

    def __init__(self):
        # short: Ray's unix sockets live under the temp dir, and a socket path may not pass 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="fwc", dir="/tmp"))
        (self.root / "token").write_text(secrets.token_hex(32))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.root / "token")}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", "--block"]
        self._node("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                            "--include-dashboard=false", *common])
        self._node("worker", [f"--address={self.address}", *common])

    def _node(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        args = [*args, f"--temp-dir={self.root / name}", f"--dashboard-agent-listen-port={free_port()}"]
        self.procs.append(subprocess.Popen([shutil.which("ray") or "ray", "start", *args], env=clean_env(**self.auth),
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        written = self.root / name / "ray_current_cluster"  # `ray start` writes it once its node is up
        deadline = time.monotonic() + NODE_START_S
        while not written.exists():
            assert self.procs[-1].poll() is None, f"ray start ({name}) ended:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"ray start ({name}) not up after {NODE_START_S} s:\n{self.log(name)}"
            time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-3000:]

    def actor_logs(self, name: str, actor: str) -> list[Path]:
        """This node's worker logs that name the actor (Ray writes ':actor_name:<class>' when an actor starts)."""
        return [p for p in (self.root / name).glob("session_*/logs/worker-*.out")
                if f":actor_name:{actor}" in p.read_text(errors="replace")]

    def stop(self) -> None:
        import psutil

        started = []
        for p in self.procs:
            try:
                started += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        # the worker node first. A node drains and stops its processes on SIGTERM; the head waits up to 30 s for
        # Ray Train's detached actors, so after a few seconds its process group (gcs_server, raylet, ...) is killed
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        _, alive = psutil.wait_procs(started, timeout=10)
        for child in alive:  # by pid: only what these two nodes started
            child.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def fwray(module: str, args: list[str], cluster: Cluster, timeout: int = 240) -> subprocess.CompletedProcess:
    env = clean_env(RAY_ADDRESS=cluster.address, **cluster.auth)
    return subprocess.run([sys.executable, "-m", module, str(SMOKE), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_prepare_and_train_on_two_nodes(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = [f"data.cache_dir={tmp_path / 'cache'}", f"resources.storage_path={tmp_path / 'runs'}",
                f"tracking.uri={uri}", "tracking.register_model=false"]  # test_tracking registers
    prepared = fwray("fwray.prepare", settings, cluster)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "prepared " in prepared.stdout

    trained = fwray("fwray.run", [*settings, "resources.num_workers=2", *TINY], cluster)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "prepare: cached" in trained.stderr  # the data the cluster prepared
    output = trained.stdout + trained.stderr

    # progress lines: each once (workers of a `ray start` cluster get fwray's settings through the runtime_env)
    lines = re.findall(r"step +\d+/4 \|[^\n]*", output)
    assert len(lines) >= 2, output[-3000:]
    twice = [line for line, n in Counter(lines).items() if n > 1]
    assert not twice, f"printed more than once: {twice}"

    # one training worker on each node: each node's own logs name a Ray Train worker
    assert cluster.actor_logs("head", "RayTrainWorker"), "no training worker ran on the head node"
    assert cluster.actor_logs("worker", "RayTrainWorker"), "no training worker ran on the worker node"

    # the run finished in MLflow, with the summary rank 0 handed back through Ray (the driver printed it)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["fwray.device"] == "cpu" and parent[0].data.params["resources.num_workers"] == "2"
    assert re.search(r"done: validation loss \d+\.\d+ -> \d+\.\d+ after 4 steps", trained.stdout), trained.stdout
