"""One optimizer step looked at closely: the gradients the optimizer receives and the update it makes, and how
closely two computations of the same step (one batch vs accumulation, one worker vs two) agree on any CPU.

Two such computations add the same float32 numbers in another order (and AVX-512, AVX2 and plain kernels order them
differently again), so they agree to float32 rounding, never bit for bit. What that rounding becomes in the update
depends on the optimizer's arithmetic:
- AdamW's first step is lr * g / (|g| + eps) per entry: it carries the gradients' float32 error (~1e-6 relative)
  except on entries whose gradient is within a few eps of zero, where a last-bit difference moves the step by a small
  share of lr. Observed: at most 0.03% of the step's largest entry. Bound: 1%.
- torch.optim.Muon rounds its update to bfloat16 before the Newton-Schulz iterations and runs them in bfloat16 (read
  torch/optim/_muon.py: `grad.bfloat16()`): float32 inputs that differ in their last bits can round to bfloat16
  values one bfloat16 ulp (2^-7 relative) apart, and the iterations carry that into the orthogonalised step. Observed:
  at most 1.7 ulps of the step's largest entry on AVX-512, AVX2 and plain kernels. Bound: 4 ulps.
A real bug (a micro-batch missed, a gradient not all-reduced) changes a step by a sizeable share of itself: the tests
that use these bounds also show that such a step falls outside them.
"""
from __future__ import annotations

import torch

BF16_ULP = 2.0 ** -7  # bfloat16 keeps 7 explicit mantissa bits
UPDATE_TOLERANCE = {"adamw": 1e-2, "muon": 4 * BF16_ULP}  # of the largest entry of each parameter's step
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7  # float32 sums in another order


def fixed_batch(seed=0, n=8, T=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50257, (n, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def look_at_step(engine, get_batch, step=0):
    """engine.step(step, get_batch), seen closely: (loss, non-finite flag, {name: the gradient the optimizer
    received (after clipping, through its pre-hook)}, {name: the update it made (weight after - before)})."""
    model = engine.raw_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    handle = engine.optimizer.optimizers["adamw"].register_step_pre_hook(  # the first to step
        lambda opt, args, kwargs: grads.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    try:
        loss, bad = engine.step(step, get_batch)
    finally:
        handle.remove()
    updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return loss, bad, grads, updates


def optimizer_of(engine) -> dict[str, str]:
    """parameter name -> the optimizer that steps it ("adamw" or "muon")."""
    owner = {id(p): name for name, o in engine.optimizer.optimizers.items()
             for g in o.param_groups for p in g["params"]}
    return {n: owner[id(p)] for n, p in engine.raw_model.named_parameters()}


def update_mismatch(a: dict, b: dict, optimizers: dict[str, str]) -> dict[str, float]:
    """name -> how far apart two updates of one parameter are, as a share of that parameter's tolerance (above 1:
    outside it)."""
    out = {}
    for name, u in a.items():
        scale = u.abs().max().clamp_min(torch.finfo(u.dtype).tiny)
        out[name] = ((u - b[name]).abs().max() / scale).item() / UPDATE_TOLERANCE[optimizers[name]]
    return out


def assert_same_update(a: dict, b: dict, optimizers: dict[str, str]) -> None:
    outside = {n: round(m, 2) for n, m in update_mismatch(a, b, optimizers).items() if m > 1}
    assert not outside, f"updates differ by more than the optimizer's rounding allows (x tolerance): {outside}"


def assert_same_grads(a: dict, b: dict) -> None:
    for name, g in b.items():
        torch.testing.assert_close(a[name], g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m, n=name: f"{n}: {m}")
