"""Peak memory of one training step and one evaluation forward, predicted without a GPU. Pure torch.

The engine's own step runs under a TorchDispatchMode that counts the bytes of live tensor storages (each rounded up
to 512 bytes, as the CUDA caching allocator does). Under FakeTensorMode no real memory is allocated and no FLOPs are
spent, so a 124M model at micro-batch 14 x 1024 is estimated in seconds on a laptop. The step runs in the dtype a CUDA
run would use (bf16 autocast for train.dtype auto/bfloat16): CPU autocast casts the same ops of this model (linear,
SDPA) to bf16 as CUDA autocast does, and the model hands none of the ops CUDA autocast runs in fp32 (pow, exp,
softmax, norms...) a bf16 tensor (tests/test_probe.py holds both), so the saved activations have the CUDA sizes:
within 0.5% of the measured peak for the modern 9 x 640 model and 5% for GPT-2 124M on an H200
(bench/memory_gap.py).

What it cannot see: the CUDA context, cuBLAS/attention workspaces, allocator fragmentation (reserved > allocated) and
what torch.compile saves or fuses. `probe.margin` is the headroom for those; bench/gpu_check.py measures the gap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..config import ModelConfig, TrainConfig
from .engine import Engine, autocast_dtype, loss_sums
from .loader import random_batch
from .model import GPT
from .optim import make_optimizer

GIB = 2**30
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes
# Reserved / allocated at the peak under fwray's allocator configuration (expandable segments map memory as it is
# needed, so little is reserved beyond what tensors use); bench/gpu_check.py measures the real ratio on a GPU.
ALLOCATOR_SLACK = 1.05
# A card's memory outside PyTorch's allocator where it cannot be measured: a CUDA 12 context with lazy module loading
# takes ~0.3-0.5 GiB on an Ada card; a desktop on the same card takes more (set probe.context_overhead_gb then).
TYPICAL_CONTEXT_OVERHEAD_GB = 0.5


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages created inside the mode (plus those `track`ed), and their peak."""

    def __init__(self):
        super().__init__()
        self.sizes = WeakIdKeyDictionary()  # storage -> bytes counted
        self._refs = []  # weakrefs whose callbacks subtract a storage when it is freed
        self.current = self.peak = 0

    def track(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st in self.sizes:
                    continue
                size = -(-st.nbytes() // BLOCK) * BLOCK
                self.sizes[st] = size
                self._refs.append(weakref.ref(st, lambda _, size=size: self._free(size)))
                self.current += size
                self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
        return out


def measure_peak_bytes(model: ModelConfig, train: TrainConfig, batch_size: int, activation_checkpointing: bool = False,
                       eval_batch_size: int | None = None, accumulation: int | None = None,
                       dtype: torch.dtype | None = None, fake: bool = True, steps: int = 2) -> dict:
    """Run `steps` engine steps and one evaluation forward on the CPU, counting live tensor bytes.

    fake=True runs under FakeTensorMode (no allocation, no compute); fake=False allocates for real (small models: the
    check that faking changes nothing). accumulation defaults to min(train.gradient_accumulation_steps, 2): the second
    micro-batch is the one that runs with the first one's gradients alive. Two steps: the second runs with the
    optimizer's state alive (AdamW's two moments per parameter; under muon, one momentum buffer per hidden matrix
    instead). Returns bytes: params, train_peak, eval_peak, peak.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    accumulation = accumulation or min(train.gradient_accumulation_steps, 2)
    train = dataclasses.replace(train, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                max_iters=train.max_iters or steps)
    dtype = dtype or torch.float32
    eval_batch_size = eval_batch_size or train.eval_batch_size or batch_size
    device = torch.device("cpu")
    counter = LiveBytes()
    with FakeTensorMode() if fake else contextlib.nullcontext(), counter:
        torch.manual_seed(train.seed)
        # built here rather than by Engine.build: .to(device) cannot swap fake parameters, and the device is the CPU
        raw = GPT(model, loss_chunk_size=train.loss_chunk_size, activation_checkpointing=activation_checkpointing)
        engine = Engine(model, train, device, raw, raw, make_optimizer(raw, train), dtype, compiled=False)
        counter.track(*raw.parameters())
        params = counter.current
        batch = random_batch(batch_size, model.block_size, device)
        counter.reset_peak()
        for step in range(steps):
            engine.step(step, lambda micro: batch)
        train_peak = counter.peak
        del batch
        val = random_batch(eval_batch_size, model.block_size, device)
        counter.reset_peak()
        # Engine.evaluate's forward (its read-back has no value under FakeTensorMode)
        with torch.no_grad(), engine.autocast():
            raw.eval()
            loss_sums(raw, [val])
        eval_peak = counter.peak
    return {"params": params, "train_peak": train_peak, "eval_peak": eval_peak, "peak": max(train_peak, eval_peak)}


def estimate_peak_bytes(model: ModelConfig, train: TrainConfig, batch_size: int,
                        activation_checkpointing: bool = False, eval_batch_size: int | None = None,
                        accumulation: int | None = None) -> dict:
    """Predicted peak bytes of a CUDA run of this model and train section at `batch_size` (no GPU, no real
    compute): `peak` allocated by tensors, `reserved` by the caching allocator (what a card's memory has to hold)."""
    dtype = autocast_dtype(train, "cuda")
    out = measure_peak_bytes(model, train, batch_size, activation_checkpointing, eval_batch_size, accumulation,
                             dtype=dtype, fake=True)
    return {**out, "reserved": int(out["peak"] * ALLOCATOR_SLACK), "method": "cpu-estimate",
            "dtype": str(dtype).replace("torch.", "")}
