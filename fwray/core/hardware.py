"""What the machine can do: the device to use, dense bf16 peak FLOPs by GPU name, MFU, memory figures. Pure torch."""
from __future__ import annotations

import functools
import os
import shutil
import sys
import sysconfig
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from ..errors import FwrayError

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
# Both names: torch 2.9's CUDA allocator takes expandable segments only from the older name (pytorch/pytorch#183387),
# and torch >= 2.9 reads the newer one first (the older one alone earns a deprecation warning)
ALLOC_CONF_ENVS = (ALLOC_CONF_ENV, "PYTORCH_CUDA_ALLOC_CONF")
ALLOC_CONF = "expandable_segments:True"


def configure_allocator() -> None:
    """Give both allocator variables fwray's configuration, or the user's where the user set one of them; a value
    the user set is never changed."""
    value = next((os.environ[name] for name in ALLOC_CONF_ENVS if os.environ.get(name)), ALLOC_CONF)
    for name in ALLOC_CONF_ENVS:
        if not os.environ.get(name):
            os.environ[name] = value


def allocator_settings(device: torch.device) -> str | None:
    """The CUDA caching allocator's effective configuration as torch reports it, e.g. 'expandable_segments:True'
    (then max_split_size_mb and garbage_collection_threshold where set); None on CPU.

    Read from the allocator, not the environment: its memory snapshot's settings and, once it holds memory, whether
    its segments really are expandable (an allocator that ignored the variable holds none that are)."""
    if device.type != "cuda":
        return None
    snapshot = torch.cuda.memory._snapshot()
    settings = snapshot["allocator_settings"]
    segments = snapshot["segments"]
    expandable = (any(s.get("is_expandable", False) for s in segments) if segments
                  else settings.get("expandable_segments", False))
    parts = [f"expandable_segments:{bool(expandable)}"]
    max_split = settings.get("max_split_size", -1)  # SIZE_MAX (no limit) comes back as -1
    if 0 < max_split < 2**62:
        parts.append(f"max_split_size_mb:{max_split // 2**20}")
    if settings.get("garbage_collection_threshold"):
        parts.append(f"garbage_collection_threshold:{settings['garbage_collection_threshold']}")
    return ",".join(parts)


def attend_as_consumer_cards() -> None:
    """Make SDPA pick its kernel in this process as on the consumer cards a capped probe emulates (sm86, sm89,
    sm120), where torch tries FlashAttention-2 first and cuDNN attention last, after math. On sm90/sm100 (H100, H200,
    B200) torch >= 2.10 with a cuDNN newer than 9.15 (torch 2.11's wheels) tries cuDNN attention first: another
    kernel, with another workspace. Switching cuDNN attention off leaves the consumer cards' order.

    Not through TORCH_CUDNN_SDPA_PREFERRED=0: torch reads that variable once per process, and newer torch reads
    TORCH_CUDNN_SDPA_DEPRIORITIZED instead."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> str:
    """The kernel F.scaled_dot_product_attention(query, key, value, ...) runs here, by torch's own choice (the
    backends enabled, their order, the device, the shapes, strides and dtypes): 'flash_attention',
    'efficient_attention', 'cudnn_attention' or 'math' ('flash_attention' on a CPU is torch's fused CPU kernel).
    Under autocast the inputs are cast first, as autocast casts them for the real call."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(low) if t.dtype == torch.float32 else t for t in (query, key, value))
    return SDPBackend(torch._fused_sdp_choice(query, key, value, *args, **kwargs)).name.lower()


class RecordSdpaBackends(TorchFunctionMode):
    """Within `with RecordSdpaBackends() as seen:`, seen.backends lists sdpa_backend of every
    F.scaled_dot_product_attention call, in call order. Eager code only: a compiled graph does not call it."""

    def __init__(self):
        super().__init__()
        self.backends: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.backends.append(sdpa_backend(*args, **kwargs))
        return func(*args, **kwargs)


def cuda_device(index: int | None = None) -> torch.device:
    """An indexed CUDA device: some torch.cuda calls (set_per_process_memory_fraction) reject a bare "cuda"."""
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


class DeviceError(FwrayError):
    """The device asked for is not there."""

    exit_code = 2


def pick_device(name: str = "auto") -> torch.device:
    """The device of a process outside Ray Train (sample, eval, a bench), from --device: "auto" is CUDA when torch
    sees a GPU, else the CPU; "cuda" or "cuda:N" a GPU, always indexed (see cuda_device); "cpu" the CPU."""
    if name == "auto":
        return cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: torch sees no CUDA GPU here; use --device auto or cpu")
    return cuda_device(device.index)


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
    """Whether torch.compile runs on this device's type, and if not, one line saying why. Importing Triton is not
    enough: it builds its kernel launchers with a C compiler and Python's headers the first time it runs (Inductor's
    CPU backend needs a C++ compiler), so one tiny function is compiled and run, once per process and device type."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False, "Triton is not installed (e.g. on Windows): torch.compile is off"
    missing = _trial_compile(device.type)
    return missing is None, missing or ""


@functools.cache
def _trial_compile(device_type: str) -> str | None:
    """None where a compiled function runs on `device_type`; otherwise what is missing, in one line."""
    try:
        torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)(torch.ones(8, device=device_type))
        return None
    except Exception as error:  # whatever the cause, the run goes on uncompiled: say which one
        return f"torch.compile failed a trial compile on {device_type}: {_what_is_missing(device_type, error)}"


def _what_is_missing(device_type: str, error: Exception) -> str:
    """The toolchain piece a failed compile lacked (the compiler Triton or Inductor looks for, Python.h), else the
    error's root cause."""
    if device_type == "cpu":  # Inductor's C++ kernels: $CXX, else g++
        compiler = os.environ.get("CXX", "g++")
        if not shutil.which(compiler):
            return f"no C++ compiler found ({compiler}): install g++ (e.g. build-essential) or set CXX"
    else:  # Triton's launchers: $CC, else gcc or clang
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        if not (compiler and shutil.which(compiler)):
            return "no C compiler found: install gcc (e.g. build-essential) or set CC"
    headers = sysconfig.get_config_var("INCLUDEPY") or ""
    if not os.path.exists(os.path.join(headers, "Python.h")):
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return f"Python headers are missing (no Python.h in {headers}): install python{version}-dev (or python3-dev)"
    while error.__cause__ is not None:
        error = error.__cause__
    first_line = next(iter(str(error).strip().splitlines()), "")
    return f"{type(error).__name__}: {first_line}"


def matmul_tflops(device: torch.device, seconds: float = 1.0) -> float:
    """This device's matmul speed (TFLOPS; fp32 on a CPU with torch's threads, bf16 on a GPU): the rough figure that
    picks which shapes --measure times where no table knows the device."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        count += 1
    c.sum().item()  # waits for the device
    return count * 2 * n**3 / (time.perf_counter() - start) / 1e12
