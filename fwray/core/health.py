"""The machine's health as people watch it while a model trains: CPU and memory, and the training GPU's utilisation,
memory, power and temperature. Pure torch; psutil (CPU, memory) and nvidia-ml-py (what torch.cuda reads through
NVML) are used when installed, and a figure that cannot be read is left out: health never stops training.

fwray samples here, at each log interval, rather than running MLflow's system-metrics monitor: that monitor samples
in a thread on its own clock, logs at its own step counter (0, 1, 2, ...) straight to the store, and stops for good
at the first request that fails (mlflow 3.17's SystemMetricsMonitor.monitor). Sampled here, the figures go out with
the loss, at the loss's step, and through the run's outbox while MLflow is away, like every other metric.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a GPU is read: fwray.tracking lists these names without loading it
    import torch

try:
    import psutil
except ImportError:  # a machine with torch alone (the GPU benchmarks' machine): no CPU or memory figures
    psutil = None

# MLflow's own system-metric names (mlflow.system_metrics): its UI charts "system/..." metrics on the run page's
# System metrics tab. Only the card rank 0 trains on is sampled, so its names carry no gpu_<index>.
CPU_UTILIZATION = "system/cpu_utilization_percentage"
MEMORY_MB = "system/system_memory_usage_megabytes"
MEMORY_PERCENT = "system/system_memory_usage_percentage"
GPU_UTILIZATION = "system/gpu_utilization_percentage"
GPU_MEMORY_MB = "system/gpu_memory_usage_megabytes"
GPU_MEMORY_PERCENT = "system/gpu_memory_usage_percentage"
GPU_POWER_W = "system/gpu_power_usage_watts"
GPU_TEMPERATURE_C = "system/gpu_temperature_celsius"

METRICS = {
    CPU_UTILIZATION: "rank 0's node: CPU busy, percent of all cores, mean over the last log_interval steps",
    MEMORY_MB: "rank 0's node: system memory in use, MB (1e6 bytes)",
    MEMORY_PERCENT: "rank 0's node: system memory in use, percent of the total",
    GPU_UTILIZATION: "rank 0's GPU: percent of the last NVML sample period (1/6 to 1 s) a kernel ran (absent on CPU)",
    GPU_MEMORY_MB: "rank 0's GPU: memory in use by every process, as nvidia-smi shows it, MB (absent on CPU)",
    GPU_MEMORY_PERCENT: "rank 0's GPU: the same, percent of the card's memory (absent on CPU)",
    GPU_POWER_W: "rank 0's GPU: power draw, watts, averaged over NVML's sample period (where the card reports it)",
    GPU_TEMPERATURE_C: "rank 0's GPU: die temperature, degrees Celsius (where the card reports it)",
}


def machine_figures() -> dict[str, float]:
    """CPU busy since the previous call (psutil keeps that counter per process) and system memory in use; {} without
    psutil."""
    if psutil is None:
        return {}
    memory = psutil.virtual_memory()
    return {CPU_UTILIZATION: psutil.cpu_percent(interval=None), MEMORY_MB: memory.used / 1e6,
            MEMORY_PERCENT: 100 * memory.used / memory.total}


def gpu_figures(device: torch.device) -> dict[str, float]:
    """`device`'s utilisation, memory in use, power and temperature; {} on CPU, and a figure this machine cannot read
    (no CUDA, no nvidia-ml-py, no NVML, a card that does not report power) left out, never raised."""
    if device.type != "cuda":
        return {}
    import torch

    out: dict[str, float] = {}
    try:  # the CUDA runtime's figure: needs no NVML
        free, total = torch.cuda.mem_get_info(device)
        out.update({GPU_MEMORY_MB: (total - free) / 1e6, GPU_MEMORY_PERCENT: 100 * (total - free) / total})
    except (RuntimeError, AssertionError):  # AssertionError: a torch built without CUDA
        pass
    # torch.cuda's NVML readers (each needs nvidia-ml-py and the driver's NVML library), and the factor to the unit
    for name, read, factor in ((GPU_UTILIZATION, torch.cuda.utilization, 1.0),
                               (GPU_POWER_W, torch.cuda.power_draw, 1e-3),  # milliwatts
                               (GPU_TEMPERATURE_C, torch.cuda.temperature, 1.0)):
        try:
            out[name] = read(device) * factor
        except Exception:  # ModuleNotFoundError, RuntimeError, pynvml.NVMLError (NotSupported on some cards)
            pass
    return out


class HealthSampler:
    """One process's sampler: `sample()` at each log interval gives every figure this machine can read."""

    def __init__(self, device: torch.device):
        self.device = device
        machine_figures()  # starts psutil's CPU counter, so the first sample covers the first interval
        if device.type == "cuda" and GPU_UTILIZATION not in gpu_figures(device):
            warnings.warn("GPU utilisation, power and temperature are not logged: torch cannot read them through "
                          "NVML here (is nvidia-ml-py installed?)", stacklevel=2)

    def sample(self) -> dict[str, float]:
        return {**machine_figures(), **gpu_figures(self.device)}
