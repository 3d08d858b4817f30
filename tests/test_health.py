"""The machine's health in MLflow: CPU and memory at every log interval of a real run, beside the loss; the GPU's
figures read as far as a machine without CUDA allows (none, and no error)."""
import pytest
import torch

from fwray.core import health
from fwray.tracking import live
from pipeline import history

MACHINE = (health.CPU_UTILIZATION, health.MEMORY_MB, health.MEMORY_PERCENT)
GPU = (health.GPU_UTILIZATION, health.GPU_MEMORY_MB, health.GPU_MEMORY_PERCENT, health.GPU_POWER_W,
       health.GPU_TEMPERATURE_C)


def test_machine_figures_are_this_machines_cpu_and_memory():
    import psutil

    figures = health.machine_figures()
    assert set(figures) == set(MACHINE)
    assert 0 <= figures[health.CPU_UTILIZATION] <= 100
    assert 0 < figures[health.MEMORY_PERCENT] <= 100
    assert figures[health.MEMORY_MB] == pytest.approx(psutil.virtual_memory().used / 1e6, rel=0.2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads a real card here: bench/gpu_check.py's ground")
def test_gpu_figures_without_cuda_are_none_and_never_raise():
    assert health.gpu_figures(torch.device("cpu")) == {}
    # a CUDA device on a machine without one: every reader fails (torch built without CUDA, no NVML library), and
    # each failure is left out rather than raised
    assert health.gpu_figures(torch.device("cuda", 0)) == {}
    with pytest.warns(UserWarning, match="GPU utilisation, power and temperature are not logged"):
        sampler = health.HealthSampler(torch.device("cuda", 0))
    assert set(sampler.sample()) == set(MACHINE)


def test_every_health_metric_is_documented():
    assert set(MACHINE + GPU) == set(health.METRICS) <= set(live.METRICS)
    assert all(name.startswith("system/") for name in health.METRICS)  # MLflow's UI: the System metrics tab


def test_a_cpu_run_logs_cpu_and_memory_at_each_log_interval_beside_the_loss(tiny_run):
    client, run_id = tiny_run["client"], tiny_run["run"].info.run_id
    loss_steps = sorted(history(client, run_id, "train_loss"))
    assert loss_steps == [4, 8, 12, 16, 20, 24]  # log_interval 4
    for name in MACHINE:
        points = history(client, run_id, name)
        assert sorted(points) == loss_steps, name
    cpu = history(client, run_id, health.CPU_UTILIZATION)
    assert all(0 <= v <= 100 for v in cpu.values()) and max(cpu.values()) > 0  # training kept a core busy
    assert all(v > 0 for v in history(client, run_id, health.MEMORY_MB).values())
    metrics = set(client.get_run(run_id).data.metrics)
    assert not metrics & set(GPU)  # a CPU run: no GPU figures, and it finished
    assert tiny_run["run"].info.status == "FINISHED"


def test_tracking_lists_the_names_without_loading_torch():
    """`python -m fwray.tracking replay` and `metrics` start without torch (~1.5 s): the names come from fwray.core.health."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = "import sys, fwray.tracking.__main__\nassert 'torch' not in sys.modules, 'torch loaded'\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
