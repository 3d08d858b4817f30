"""Joining a Ray cluster, and the ways that fails. fwray preparing and training on a real two-node cluster
(tests/cluster.py) is tests/test_object_storage.py: one two-node run for the suite, its nodes sharing no disk.
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cluster import ROOT, SMOKE, clean_env, free_port
from fwray import ray_session


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
