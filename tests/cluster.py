"""A real two-node Ray cluster on this machine, for the tests that join one (tests/conftest.py starts it once a
session): two `ray start --block` processes (a head and a worker node, one CPU each, token authentication with a
token file of their own), each node with its own --temp-dir and $TMPDIR, so the pytest session's Ray and any other
Ray here are never touched and the nodes share no folder. It is stopped by killing those two processes' groups and,
by pid, whatever they started: `ray stop` would stop every Ray on the machine.
"""
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"
NODE_START_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address, token setting, fwray-set Ray variable or object-store setting
    (TIKTOKEN_CACHE_DIR stays: tests/conftest.py made it absolute)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


class Cluster:
    """A head and a worker node, each a `ray start --block` process in its own session."""

    def __init__(self, env: dict[str, str] | None = None):
        """env: what both nodes' processes get besides a clean environment (an object store's keys)."""
        # short: Ray's unix sockets live under the temp dir, and a socket path may not pass 107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="fwc", dir="/tmp"))
        self.env = env or {}
        (self.root / "token").write_text(secrets.token_hex(32))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.root / "token")}
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", "--block"]
        self._node("head", ["--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                            "--include-dashboard=false", *common])
        self._node("worker", [f"--address={self.address}", *common])

    def _node(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")
        args = [*args, f"--temp-dir={self.root / name}", f"--dashboard-agent-listen-port={free_port()}"]
        # each node its own $TMPDIR: fwray's node-local files (a cache fetched from object storage) go there
        tmp = self.root / name / "tmp"
        tmp.mkdir(parents=True)
        env = clean_env(**self.auth, **self.env, TMPDIR=str(tmp))
        self.procs.append(subprocess.Popen([shutil.which("ray") or "ray", "start", *args], env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        self.nodes[name] = self.procs[-1]
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

    def train_workers(self, name: str) -> list:
        """This node's Ray Train worker processes (Ray names an actor's process after its class)."""
        import psutil

        found = []
        for p in psutil.Process(self.nodes[name].pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self) -> None:
        """Kill both nodes and everything they started, at once: the suite is done with them, and a graceful stop
        waits for Ray Train's detached actors (the head up to 30 s)."""
        import psutil

        started = []
        for p in self.procs:
            try:
                started += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in self.procs:  # each node leads its own process group (gcs_server, raylet, ...)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for child in started:  # by pid: only what these two nodes started, wherever its group is
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(started, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def fwray(module: str, args: list[str], cluster: Cluster, env: dict[str, str] | None = None,
          timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m module smoke.yaml args...` as a user on this machine would run it against the cluster."""
    env = clean_env(RAY_ADDRESS=cluster.address, **cluster.auth, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, str(SMOKE), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
