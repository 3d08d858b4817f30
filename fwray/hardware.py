"""What the machine can do: the device to use, dense bf16 peak FLOPs by GPU name, MFU, memory figures. Pure torch."""
from __future__ import annotations

import warnings

import torch

# Dense (no sparsity) bf16 tensor-core peak, TFLOPS. Consumer cards: SMs x boost clock x tensor FLOP/clk/SM
# (512 for Ampere/Ada/Blackwell consumer at dense bf16 with fp32 accumulate). Longest names first: "4070 ti" before "4070".
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("h200", 989.0), ("h100 pcie", 756.0), ("h100", 989.0), ("gh200", 989.0), ("b200", 2250.0), ("b100", 1750.0),
    ("a100", 312.0), ("a800", 312.0), ("a10g", 70.0), ("a10", 125.0), ("a30", 165.0), ("a40", 149.7),
    ("a6000", 154.8), ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("v100", 125.0), ("t4", 65.0),
    ("rtx 6000 ada", 364.0),
    ("5090", 209.5), ("5080", 112.6), ("5070 ti", 87.9), ("5070", 61.7), ("5060 ti", 47.4), ("5060", 38.4),
    ("4090", 165.2), ("4080 super", 104.4), ("4080", 97.5), ("4070 ti super", 88.2), ("4070 ti", 80.2),
    ("4070 super", 71.0), ("4070", 58.3), ("4060 ti", 44.1), ("4060", 30.2),
    ("3090 ti", 80.0), ("3090", 71.0), ("3080 ti", 68.2), ("3080", 59.5), ("3070 ti", 43.5), ("3070", 40.6),
    ("3060 ti", 32.4), ("3060", 25.5),
]


def pick_device(use_gpu: bool | str) -> torch.device:
    if use_gpu is True and not torch.cuda.is_available():
        raise RuntimeError("resources.use_gpu is true but torch sees no CUDA GPU; set resources.use_gpu: auto")
    return torch.device("cuda" if use_gpu is not False and torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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
                      f"enable it", stacklevel=2)
    return peak


def table_peak(gpu_name: str) -> float | None:
    """The table's dense bf16 TFLOPS for a GPU name such as 'NVIDIA GeForce RTX 4070'."""
    name = gpu_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, block_size: int,
                    n_position_params: int = 0) -> float:
    """Training FLOPs per token, PaLM appendix B as nanoGPT: 6N + 12*L*H*Q*T (position embeddings excluded from N)."""
    return 6 * (n_params - n_position_params) + 12 * n_layer * n_head * head_dim * block_size


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


def compile_available(device: torch.device) -> tuple[bool, str]:
    """Whether torch.compile can run here, and why not."""
    if device.type != "cuda":
        return False, "torch.compile is off on CPU"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed (e.g. on Windows): torch.compile is off"
    return True, ""
