"""The optimizers and the learning-rate schedule, from the train section alone. Pure torch.

train.optimizer = adamw: one fused AdamW for every parameter (nanoGPT). muon: torch.optim.Muon for the hidden
matrices, fused AdamW for the embedding, the output layer, norms, biases and scalars. Either way the parameters fall
into four groups, each with its own base rate, and one schedule scales them all: a function of the step only, so a
resumed run continues it exactly.
"""
from __future__ import annotations

import math
from collections import ChainMap

import torch

from ..config import TrainConfig
from ..errors import FwrayError
from .layers import CausalSelfAttention

# Muon's rate. Muon's step is an orthogonalised matrix; with adjust_lr_fn "original" (Keller Jordan's) it is scaled
# by sqrt(max(1, rows / cols)), so its spectral norm is lr times the matrix's aspect ratio, whatever the width: a
# wider model keeps its blocks' aspect ratios, so one rate serves every n_embd. "match_rms_adamw" (Moonshot) gives the
# step AdamW's per-entry size instead, which makes its spectral norm grow as sqrt(n_embd): the rate would need
# retuning at every width (its point is reusing an AdamW recipe's rate, not transfer across widths).
MUON_ADJUST_LR = "original"
MUON_LR = 0.02  # nanochat's matrix_lr
# AdamW's rates for the embedding and the output layer under muon, at n_embd = 768 and scaled by (n_embd / 768) ** -0.5
# as nanochat does: AdamW's step is about lr per entry at any width, and the logits sum over n_embd of them, so a
# wider head needs a smaller rate. nanochat's own values assume its init (embedding std 1, head zero); these are for
# fwray's GPT-2 init (std 0.02).
EMBEDDING_LR = 0.004
HEAD_LR = 0.004
REFERENCE_WIDTH = 768
MUON_MOMENTUM_START = 0.85  # modded-nanogpt's: less momentum while the first gradients are large and change fast


def param_groups(model: torch.nn.Module, train: TrainConfig) -> list[dict]:
    """Every trainable parameter in exactly one group, sorted by what it is rather than by its name: `scalars`
    (fewer than 2 dims: norms, biases, gains), `head` (the output layer `lm_head`, and so the embedding tied to it),
    `embedding` (nn.Embedding weights) and `matrices` (the rest: the blocks' Linear weights). Each group carries its
    base rate; weight decay goes on every matrix, none on scalars. Empty groups are left out."""
    t = train
    muon = t.optimizer == "muon"
    width_scale = (model.config.n_embd / REFERENCE_WIDTH) ** -0.5
    rates = {"scalars": t.learning_rate,
             "head": _given(t.head_lr, HEAD_LR * width_scale if muon else t.learning_rate),
             "embedding": _given(t.embedding_lr, EMBEDDING_LR * width_scale if muon else t.learning_rate),
             "matrices": _given(t.muon_lr, MUON_LR) if muon else t.learning_rate}
    decays = {"head": t.weight_decay, "embedding": t.weight_decay,
              "matrices": _given(t.muon_weight_decay, t.weight_decay) if muon else t.weight_decay}
    head = {id(p) for p in model.lm_head.parameters()}
    params = {name: [] for name in rates}
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # a tied parameter is met twice (as wte and lm_head): it joins one group
            if p.ndim < 2:
                name = "scalars"
            elif id(p) in head:
                name = "head"
            elif isinstance(module, torch.nn.Embedding):
                name = "embedding"
            else:
                name = "matrices"
            params[name].append(p)
    return [{"name": name, "params": params[name], "lr": lr,
             "weight_decay": 0.0 if name == "scalars" else decays[name]}
            for name, lr in rates.items() if params[name]]


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def make_optimizer(model: torch.nn.Module, train: TrainConfig) -> "Optimizers":
    groups = param_groups(model, train)

    def adamw(groups: list[dict]) -> torch.optim.AdamW:
        # fused (CUDA and, since torch 2.4, CPU): one kernel per group, and it skips a step on the device when told
        # found_inf, so a non-finite step costs no host sync
        return torch.optim.AdamW(groups, betas=(train.beta1, train.beta2), fused=True)

    if train.optimizer == "adamw":
        return Optimizers(adamw=adamw(groups))
    # the fused query, key and value projection (3C x C) as three C x C matrices: each orthogonalised on its own
    row_blocks = ({id(m.c_attn.weight): 3 for m in model.modules() if isinstance(m, CausalSelfAttention)}
                  if train.muon_split_qkv else {})
    return Optimizers(adamw=adamw([g for g in groups if g["name"] != "matrices"]),
                      muon=Muon([g for g in groups if g["name"] == "matrices"], row_blocks,
                                momentum=train.muon_momentum, adjust_lr_fn=MUON_ADJUST_LR))


class Muon(torch.optim.Muon):
    """torch.optim.Muon's update (its settings, state and checkpoints), taken for many matrices at once and skipped on
    the device:

    - Batched: the matrices of one shape are stacked and orthogonalised together (Newton-Schulz as batched matmuls),
      a few dozen kernels a step instead of torch's ~30 per matrix. torch's step is bound by launching those: ~20 ms
      a step for the modern 9 x 640 model's 54 matrices on an H200 (bench/step_profile.py), as long as a micro-step.
    - Skipped on the device: where `found_inf` (set as on fused AdamW) is 1, weights and momentum stay as they were,
      with no read-back (torch's Muon has no found_inf: the flag would cost a host sync, and a GPU idle while the
      step is launched).
    - Row blocks: a matrix listed in `row_blocks` (id -> count) is updated as that many stacked matrices of equal rows
      (modded-nanogpt's (3, C, C) view of the attention's fused query, key and value weight); parameters and state
      keep their shapes. Muon's author, nanochat and Moonlight report that separate matrices train better: as one
      3C x C matrix, a step's singular directions mix queries, keys and values.
    """

    def __init__(self, params, row_blocks: dict[int, int], **kwargs):
        super().__init__(params, **kwargs)
        self.row_blocks = row_blocks
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self) -> None:  # no closure: fwray's loop computes the loss before the step
        for group in self.param_groups:
            by_shape: dict[torch.Size, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                blocks = self.row_blocks.get(id(p), 1)
                # row blocks of a contiguous matrix are views: updates land in the parameter and its momentum
                for view in zip(p.chunk(blocks), p.grad.chunk(blocks), state["momentum_buffer"].chunk(blocks)):
                    by_shape.setdefault(view[0].shape, []).append(view)
            for shape, views in by_shape.items():
                self._update(group, shape, *map(list, zip(*views)))

    def _update(self, group: dict, shape: torch.Size, params: list, grads: list, bufs: list) -> None:
        """torch's Muon step (torch/optim/_muon.py, _single_tensor_muon) on same-shape matrices, stacked."""
        momentum = group["momentum"]
        g, buf = torch.stack(grads), torch.stack(bufs)
        keep = None
        if self.found_inf is not None:
            keep = 1.0 - self.found_inf.float()
            g = torch.where(keep.bool(), g, buf)  # a skipped step: the momentum is lerped toward itself
        buf.lerp_(g, 1 - momentum)
        torch._foreach_copy_(bufs, list(buf.unbind(0)))
        update = g.lerp_(buf, momentum) if group["nesterov"] else buf
        update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        lr, decay = group["lr"], group["lr"] * group["weight_decay"]
        step = -lr * math.sqrt(max(1, shape[0] / shape[1])) if group["adjust_lr_fn"] in (None, "original") else \
            -lr * 0.2 * math.sqrt(max(shape))  # match_rms_adamw (Moonshot)
        if keep is None:
            torch._foreach_mul_(params, 1 - decay)
            torch._foreach_add_(params, list(update.unbind(0)), alpha=step)
        else:  # factors of 1 (no change) where the step is skipped
            torch._foreach_mul_(params, 1 - decay * keep)
            torch._foreach_add_(params, list((update.float() * (step * keep)).unbind(0)))


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """Newton-Schulz on a stack of matrices (n, rows, cols) in bfloat16, as torch's _zeropower_via_newtonschulz does
    for one: each brought to spectral norm <= 1, then `steps` quintic iterations toward U V^T."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Optimizers:
    """One model's optimizers, stepped, saved and loaded as one: `adamw` always, `muon` under train.optimizer = muon.

    The base rates are the config's (taken at construction; a checkpoint's are not loaded), so a resumed run follows
    its config as the uninterrupted one did.
    """

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        self.base_lrs = [g["lr"] for g in self.param_groups]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    @property
    def state(self) -> ChainMap:
        """parameter -> its optimizer state, whichever optimizer holds it."""
        return ChainMap(*(o.state for o in self.optimizers.values()))

    def step(self, lr_multiplier: float, found_inf: torch.Tensor, muon_momentum: float | None = None) -> None:
        """Every group at its base rate x `lr_multiplier` (and Muon's at `muon_momentum`, when given); nothing
        changes (weights, moments, momentum) where `found_inf` (a device scalar) is 1."""
        for group, base in zip(self.param_groups, self.base_lrs):
            group["lr"] = base * lr_multiplier
        muon = self.optimizers.get("muon")
        if muon is not None and muon_momentum is not None:
            for group in muon.param_groups:
                group["momentum"] = muon_momentum
        for optimizer in self.optimizers.values():
            optimizer.found_inf = found_inf  # fused AdamW and fwray's Muon skip on the device where it is 1: no sync
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise FwrayError(f"the checkpoint's optimizer state has parts {sorted(state)}, this run's optimizers are "
                             f"{sorted(self.optimizers)}: it was saved under another train.optimizer (or by an older "
                             f"fwray); resume with the setting it was saved with")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def lr_multiplier(step: int, train: TrainConfig) -> float:
    """The schedule at `step`, as a share of every group's base rate: linear warmup to 1, then decay to
    min_lr / learning_rate at lr_decay_iters (the floor after it) by a cosine (nanoGPT's) or, under wsd, a constant
    1 and a linear decay over the last decay_fraction of lr_decay_iters."""
    t = train
    end = t.lr_decay_iters if t.lr_decay_iters is not None else t.max_iters
    floor = t.min_lr / t.learning_rate
    if step < t.warmup_iters:
        return (step + 1) / (t.warmup_iters + 1)
    if step >= end:
        return floor
    if t.schedule == "wsd":
        start = (1 - t.decay_fraction) * end
        decayed = max(0.0, (step - start) / (end - start))
    else:
        decayed = 0.5 * (1.0 - math.cos(math.pi * (step - t.warmup_iters) / max(1, end - t.warmup_iters)))
    return 1.0 - decayed * (1.0 - floor)


def muon_momentum(step: int, train: TrainConfig) -> float:
    """Muon's momentum at `step`: from MUON_MOMENTUM_START linearly up to train.muon_momentum over the first
    train.muon_momentum_warmup steps (modded-nanogpt: 0.85 -> 0.95 over 300), then constant. A function of the step
    only, as lr_multiplier: a resumed run continues it exactly."""
    t = train
    if step >= t.muon_momentum_warmup:
        return t.muon_momentum
    done = step / t.muon_momentum_warmup
    return (1 - done) * MUON_MOMENTUM_START + done * t.muon_momentum
