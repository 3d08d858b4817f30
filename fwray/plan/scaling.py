"""The data-constrained scaling law fwray.plan ranks candidates with. Pure arithmetic.

Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (arXiv:2305.16264), eq. 5, the constants as
published in the paper's repository (huggingface/datablations, README, "Parametric Fit"). Chinchilla's
L = E + A / N^alpha + B / D^beta, its base constants (E, A, B, alpha, beta) from Chinchilla-form curves on C4, with N
and D replaced by their effective values, whose constants (R*_D, R*_N) alone come from the paper's repeated-data runs
with the GPT-2 tokenizer:
- repeated tokens are worth less: D' = U + U R*_D (1 - exp(-R_D / R*_D)), R_D = D / U - 1 repetitions of the U unique
  tokens (a 2nd-4th epoch is worth almost as much as fresh data, a 40th little);
- parameters beyond the compute-optimal size for U unique tokens are worth less the same way (R*_N).
The predicted loss is in the paper's units (C4 validation loss): fwray compares candidates with it and shows it as
"law", never as the loss the run will reach.

Which parameters. fwray counts them one way at every budget: without the token table, an untied output head and a
learned position table (Kaplan et al. 2020's non-embedding count). Each token reads one row of a table, so the tables
buy a model little capacity for their size, and they are most of a small model: 64M of the 4070 family's 109M at
depth 9, 3M+ of any GPT-2-vocabulary model. Counting them ranks small models as if they were large ones; for the
models the law was fitted on (up to billions of parameters) they are a few percent and the two counts nearly agree.
Below ~1e8 tokens (minutes on a CPU) counting every parameter even breaks the ranking: every shape is then far past
the compute-optimal size, N' saturates and the smallest shape always wins, which bench/plan_bench.py measured wrong.
No constant is refitted.

Compute. The fit's smallest runs spend ~1e19 FLOPs (FITTED_MIN_FLOPS); a 12-hour budget on a 4070 is ~2e18: there the
law extrapolates, which fwray.plan says beside its ranking.

Why this form: bench/plan_bench.py's CPU runs, in the README ("What should I train?", Small-scale ranking).
"""
from __future__ import annotations

import math

# huggingface/datablations README: a, b, e, alpha, beta, rd_star, rn_star = [6.255414, 7.3049974, 0.6254804,
# 0.3526596, 0.3526596, 15.387756, 5.309743], with A = exp(a), B = exp(b), E = exp(e)
A = math.exp(6.255414)
B = math.exp(7.3049974)
E = math.exp(0.6254804)
ALPHA = BETA = 0.3526596
R_D_STAR = 15.387756
R_N_STAR = 5.309743
# D_to_N in the paper's code: the compute-optimal parameters for D tokens, N = (D G)^(beta/alpha) G
_G = ((ALPHA * A) / (BETA * B)) ** (1 / (ALPHA + BETA))


def optimal_params(tokens: float) -> float:
    """Chinchilla-optimal parameters for `tokens` training tokens under this fit (~tokens / 19.6)."""
    return (tokens * _G) ** (BETA / ALPHA) * _G


def effective_tokens(tokens: float, unique: float) -> float:
    """D': the value of `tokens` training tokens drawn from `unique` distinct ones (less than one epoch: all new)."""
    seen = min(tokens, unique)  # U_D, the unique tokens the run reads
    repeats = tokens / seen - 1
    return seen + seen * R_D_STAR * (1 - math.exp(-repeats / R_D_STAR))


def effective_params(params: float, tokens: float, unique: float) -> float:
    """N': parameters past the compute-optimal size for the unique tokens read count for less."""
    useful = min(params, optimal_params(min(tokens, unique)))  # U_N
    excess = params / useful - 1
    return useful + useful * R_N_STAR * (1 - math.exp(-excess / R_N_STAR))


FITTED_MIN_FLOPS = 1e19  # the fit's smallest compute: below it the law extrapolates


def loss(params: float, tokens: float, unique: float) -> float:
    """The law's loss for `params` (non-embedding) parameters trained on `tokens` tokens of which `unique` are
    distinct."""
    return E + A / effective_params(params, tokens, unique) ** ALPHA + B / effective_tokens(tokens, unique) ** BETA
