"""What the machine can do: the device to use, dense bf16 peak FLOPs by GPU name, MFU, memory figures. Pure torch."""
from __future__ import annotations

import os
import warnings

import torch

from .errors import FwrayError

# Dense (no sparsity) bf16 tensor-core peak, TFLOPS, by the card's model name as `normalise_gpu_name` writes it.
# Consumer cards: SMs x boost clock x 512 tensor FLOP/clk/SM (Ampere/Ada/Blackwell consumer, dense bf16 with fp32
# accumulate). Names match whole: a laptop part or a card not listed gets no MFU, not its desktop namesake's peak.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "h200": 989.0, "h200 nvl": 835.0, "h100 80gb hbm3": 989.0, "h100 sxm5 80gb": 989.0, "h100 pcie": 756.0,
    "h100 nvl": 835.0, "gh200 480gb": 989.0, "b200": 2250.0, "b100": 1750.0,
    "a100 sxm4 80gb": 312.0, "a100 sxm4 40gb": 312.0, "a100 pcie 40gb": 312.0, "a100 80gb pcie": 312.0,
    "a800 80gb pcie": 312.0, "a10g": 70.0, "a10": 125.0, "a30": 165.0, "a40": 149.7,
    "l4": 121.0, "l40": 181.0, "l40s": 362.0,
    "rtx a6000": 154.8, "rtx a5000": 111.1, "rtx a4000": 76.7, "rtx 6000 ada generation": 364.0,
    "rtx 5090": 209.5, "rtx 5080": 112.6, "rtx 5070 ti": 87.9, "rtx 5070": 61.7, "rtx 5060 ti": 47.4,
    "rtx 5060": 38.4,
    "rtx 4090": 165.2, "rtx 4090 d": 147.1, "rtx 4080 super": 104.4, "rtx 4080": 97.5, "rtx 4070 ti super": 88.2,
    "rtx 4070 ti": 80.2, "rtx 4070 super": 71.0, "rtx 4070": 58.3, "rtx 4060 ti": 44.1, "rtx 4060": 30.2,
    "rtx 3090 ti": 80.0, "rtx 3090": 71.0, "rtx 3080 ti": 68.2, "rtx 3080": 59.5, "rtx 3070 ti": 43.5,
    "rtx 3070": 40.6, "rtx 3060 ti": 32.4, "rtx 3060": 25.5,
}

# Memory, GB, by the same names: what fwray.plan plans for when probe.gpu_memory_gb is not set. Cards sold with two
# memory sizes under one name (RTX 4060 Ti 8/16 GB, RTX 3060 8/12 GB, ...) are left out: say probe.gpu_memory_gb.
GPU_MEMORY_GB: dict[str, float] = {
    "h200": 141, "h200 nvl": 141, "h100 80gb hbm3": 80, "h100 sxm5 80gb": 80, "h100 pcie": 80, "h100 nvl": 94,
    "a100 sxm4 80gb": 80, "a100 sxm4 40gb": 40, "a100 pcie 40gb": 40, "a100 80gb pcie": 80, "a800 80gb pcie": 80,
    "a10g": 24, "a10": 24, "a30": 24, "a40": 48, "l4": 24, "l40": 48, "l40s": 48,
    "rtx a6000": 48, "rtx a5000": 24, "rtx a4000": 16, "rtx 6000 ada generation": 48,
    "rtx 5090": 32, "rtx 5080": 16, "rtx 5070 ti": 16, "rtx 5070": 12,
    "rtx 4090": 24, "rtx 4090 d": 24, "rtx 4080 super": 16, "rtx 4080": 16, "rtx 4070 ti super": 16,
    "rtx 4070 ti": 12, "rtx 4070 super": 12, "rtx 4070": 12, "rtx 4060": 8,
    "rtx 3090 ti": 24, "rtx 3090": 24, "rtx 3080 ti": 12, "rtx 3070 ti": 8, "rtx 3070": 8, "rtx 3060 ti": 8,
}


def table_memory(gpu_name: str) -> float | None:
    """The table's memory in GB for a GPU name such as 'NVIDIA GeForce RTX 4070' or 'RTX 4070'."""
    return GPU_MEMORY_GB.get(normalise_gpu_name(gpu_name))


# One allocator configuration for the probe and for training, set before CUDA starts in every process that trains
# or probes: expandable segments grow one mapping instead of caching fixed blocks, so reserved memory stays close to
# allocated memory and a 12 GB card does not run out through fragmentation.
ALLOC_CONF_ENV = "PYTORCH_ALLOC_CONF"
ALLOC_CONF = "expandable_segments:True"


def configure_allocator() -> None:
    """Set fwray's CUDA allocator configuration unless the user set one (PYTORCH_ALLOC_CONF or its older name)."""
    if not (os.environ.get(ALLOC_CONF_ENV) or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ[ALLOC_CONF_ENV] = ALLOC_CONF


def cuda_device(index: int | None = None) -> torch.device:
    """An indexed CUDA device: some torch.cuda calls (set_per_process_memory_fraction) reject a bare "cuda"."""
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


class DeviceError(FwrayError):
    """The configured device is not there."""


def pick_device(use_gpu: bool | str) -> torch.device:
    """This process's device for resources.use_gpu (true, false or auto), for commands that run outside Ray Train."""
    if use_gpu is True and not torch.cuda.is_available():
        raise DeviceError("resources.use_gpu is true but torch sees no CUDA GPU here; set resources.use_gpu: auto")
    return cuda_device() if use_gpu is not False and torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def normalise_gpu_name(name: str) -> str:
    """'NVIDIA GeForce RTX 4070' -> 'rtx 4070'; 'NVIDIA A100-SXM4-80GB' -> 'a100 sxm4 80gb'."""
    words = name.lower().replace("-", " ").replace("_", " ").split()
    while words and words[0] in ("nvidia", "geforce", "tesla", "quadro"):
        words.pop(0)
    return " ".join(words)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Dense bf16 peak of `device` in TFLOPS; None (with one warning) where the GPU is not in the table."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = device_name(device)
    peak = table_peak(name)
    if peak is None:
        warnings.warn(f"no peak-FLOPs entry for GPU {name!r}: MFU is not reported; set hardware.peak_tflops to "
                      f"this card's dense bf16 TFLOPS to enable it", stacklevel=2)
    return peak


def table_peak(gpu_name: str) -> float | None:
    """The table's dense bf16 TFLOPS for a GPU name such as 'NVIDIA GeForce RTX 4070' or 'RTX 4070'."""
    return PEAK_BF16_TFLOPS.get(normalise_gpu_name(gpu_name))


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * 1e12)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated and reserved GPU memory since the last reset, GiB (empty on CPU)."""
    if device.type != "cuda":
        return {}
    return {"peak_alloc_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}


def context_overhead_bytes(device: torch.device) -> int:
    """Card memory used outside PyTorch's allocator (CUDA context, cuBLAS, other processes, a display): total - free
    - reserved, after one small matmul has brought cuBLAS up."""
    torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can run here, and why not."""
    if device.type != "cuda":
        return False, "torch.compile is off on CPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed (e.g. on Windows): torch.compile is off"
    return True, ""
