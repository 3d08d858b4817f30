"""The optimizers and the learning-rate schedule, from the train section alone. Pure torch.

train.optimizer = adamw: one fused AdamW for every parameter (nanoGPT). muon: torch.optim.Muon for the hidden
matrices, fused AdamW for the embedding, the output layer, norms, biases and scalars. Either way the parameters fall
into four groups, each with its own base rate, and one schedule scales them all: a function of the step only, so a
resumed run continues it exactly.
"""
from __future__ import annotations

import inspect
import math
from collections import ChainMap

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.optim._muon import muon as muon_update  # torch's functional Muon step (torch.optim.Muon.step calls it)

from ..config import TrainConfig
from ..errors import FwrayError
from .layers import CausalSelfAttention

# the group settings the functional step takes, read from its signature: torch versions add some (use_addmm)
MUON_SETTINGS = [k for k in inspect.signature(muon_update).parameters
                 if k not in ("params", "grads", "muon_momentum_bufs", "foreach", "has_complex")]

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
    """torch's Muon, where a matrix listed in `row_blocks` (id -> count) is updated as that many stacked matrices of
    equal rows: momentum, orthogonalisation, the shape's rate adjustment and decay on each (modded-nanogpt's (3, C, C)
    view of the attention's fused query, key and value weight). The parameters and their state keep their shapes, so
    checkpoints do not depend on it. Muon's author, nanochat and Moonlight report that separate matrices train
    better: as one 3C x C matrix, a step's singular directions mix queries, keys and values."""

    def __init__(self, params, row_blocks: dict[int, int], **kwargs):
        super().__init__(params, **kwargs)
        self.row_blocks = row_blocks

    @torch.no_grad()
    def step(self) -> None:  # no closure: fwray's loop computes the loss before the step
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                blocks = self.row_blocks.get(id(p), 1)
                # row blocks of a contiguous matrix are views: the update lands in the parameter and its momentum
                muon_update(list(p.chunk(blocks)), list(p.grad.chunk(blocks)),
                            list(state["momentum_buffer"].chunk(blocks)), has_complex=False,
                            **{k: group[k] for k in MUON_SETTINGS})


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
        # Muon has no found_inf: the flag is read back, the one host sync of a Muon step. A fake tensor (the memory
        # estimate's) has no value: it takes the step, the larger case.
        if muon is not None and not is_fake(found_inf) and found_inf.item():
            return
        self.optimizers["adamw"].found_inf = found_inf  # fused AdamW skips on the device where found_inf is 1
        for optimizer in self.optimizers.values():
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
