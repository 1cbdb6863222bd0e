"""Loss weighting: methods that need no per-task gradients, so they run on the cheap summed
path (one backward of a weighted sum of the task losses). A registry is a plain dict of specs.

- ``sum``, ``mean``: the plain joint objective.
- ``rlw``: random loss weighting (Lin et al. 2022): w = softmax(z), z ~ N(0, I) drawn per step
  from the (seed, step) generator, so every rank draws the same w.
- ``uw``: uncertainty weighting (Kendall et al. 2018) in LibMTL's form for every task,
  sum_k L_k / (2 exp(s_k)) + s_k / 2 with learnable s_k = log sigma_k^2: parameters of the
  model (``MultitaskModel.loss_log_vars``), so DDP/ZeRO reduce their gradients like any other.
- ``dwa``: dynamic weight average (Liu et al. 2019): w_k = K softmax(r / T)_k with
  r_k = Lbar_k(n-1) / Lbar_k(n-2), the task's mean loss over the last two windows of
  ``method.dwa_window`` steps (the paper's window is an epoch); 1 until two windows are done.
- ``famo``: FAMO (Liu et al. 2023): minimises sum_k z_k log L_k / c with z = softmax(xi),
  c = sum_k z_k / L_k, then moves xi by Adam on delta_k = log L_k(theta_t) - log L_k(theta_t+1),
  the same batches' losses before and after the update (one extra forward without gradients,
  as in the authors' code).
- ``gls``: geometric loss strategy (Chennupati et al. 2019): the geometric mean of the task
  losses, (prod_k L_k)^(1/k), as exp(mean log L_k) (a product of many small losses underflows);
  its gradient weights each task by Gbar / (k L_k).
- ``stch``: smooth Tchebycheff scalarisation (Lin et al. 2024) on the log losses:
  k mu log sum_k exp(log(L_k / z_k) / mu), z the "nadir" losses, after ``method.stch_warmup``
  steps of sum_k log L_k whose mean global losses become z (the authors' code warms up for four
  epochs and takes the fourth's mean; a fine-tuning run of one to three epochs has steps, not
  epochs, to spare). Its gradient weights task k by k softmax(log(L_k / z_k) / mu)_k / L_k (the
  factor k, LibMTL's, keeps the scale of the warm-up's sum of log losses).

Everything a weight depends on is global: the losses are the global batch's (the ranks'
share-weighted losses averaged, K floats all-reduced), the state is updated from them only and
saved in checkpoints. Under FAMO the gradient of log L_k(global) is grad L_k / L_k(global), so
each micro-batch's coefficients come from that micro-batch's global losses (with
``train.grad_accum`` 1 the step's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

State = dict  # name -> float64 tensor over the run's K tasks; JSON-saved in checkpoints


@dataclass
class WeightingInputs:
    tasks: torch.Tensor
    """[k] long: the micro-batch's tasks as indexes into the run's K."""
    generator: torch.Generator
    """Seeded from (seed, step): identical on every rank."""
    cfg: object
    """The run's MethodCfg."""
    global_losses: Callable[[], torch.Tensor]
    """-> [k] float64: this micro-batch's global task losses (one all-reduce; only when asked)."""
    log_vars: torch.Tensor | None
    """UW's learnable [K] log-variances (a model parameter), else None."""


@dataclass(frozen=True)
class LossWeightingSpec:
    combine: Callable[[list, WeightingInputs, State], torch.Tensor]
    """(the micro-batch's task losses in task order, inputs, state) -> the loss to back-propagate."""
    source: str
    init_state: Callable[[int], State] | None = None
    after_step: Callable[[State, torch.Tensor, torch.Tensor, torch.Tensor | None, object], None] | None = None
    """(state, tasks [k], the step's global losses [k], the losses after the update or None, cfg)."""
    reevaluate: bool = False
    """after_step needs the same batches' losses after the update (one forward, no gradients)."""
    learnable: bool = False
    """Adds ``loss_log_vars`` to the model (UW)."""


def _weighted(parts: list, w: torch.Tensor) -> torch.Tensor:
    return sum(p * float(wk) for p, wk in zip(parts, w.tolist()))


def _sum(parts, inputs, state):
    return sum(parts)


def _mean(parts, inputs, state):
    return sum(parts) / len(parts)  # the step's task count (global), not this rank's


def _rlw(parts, inputs, state):
    return _weighted(parts, torch.softmax(torch.randn(len(parts), generator=inputs.generator, dtype=torch.float64), 0))


def _uw(parts, inputs, state):
    s = inputs.log_vars[inputs.tasks.to(inputs.log_vars.device)]
    return sum(p / (2 * s[i].exp()) + s[i] / 2 for i, p in enumerate(parts))


def dwa_weights(state: State, tasks: torch.Tensor, T: float) -> torch.Tensor:
    prev1, prev2 = state["prev1"][tasks], state["prev2"][tasks]
    if bool((prev2 <= 0).any()):  # fewer than two complete windows
        return torch.ones(len(tasks), dtype=torch.float64)
    return len(tasks) * torch.softmax(prev1 / prev2 / T, 0)


def _dwa(parts, inputs, state):
    return _weighted(parts, dwa_weights(state, inputs.tasks, inputs.cfg.dwa_temperature))


def _dwa_after(state, tasks, losses, after, cfg) -> None:
    state["sum"][tasks] += losses
    state["count"][tasks] += 1
    state["steps"] += 1
    if int(state["steps"]) % cfg.dwa_window == 0:  # a window ends: shift the averages
        seen = state["count"] > 0
        state["prev2"][seen] = state["prev1"][seen]
        state["prev1"][seen] = state["sum"][seen] / state["count"][seen]
        state["sum"].zero_()
        state["count"].zero_()


FAMO_EPS = 1e-8  # the authors' code: D = L - min_L + 1e-8 (min_L = 0 here)


def famo_coefficients(xi: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """d/dL_k of sum_j z_j log(L_j + eps) / c with c = sum_j z_j / (L_j + eps), c held constant."""
    z = torch.softmax(xi, 0)
    D = losses + FAMO_EPS
    c = (z / D).sum()
    return z / (c * D)


def _famo(parts, inputs, state):
    a = famo_coefficients(state["xi"][inputs.tasks], inputs.global_losses())
    return _weighted(parts, a)


def _famo_after(state, tasks, before, after, cfg) -> None:
    """xi <- Adam(xi, grad) with grad = J_softmax(xi)^T delta + gamma xi (Adam's L2 weight decay,
    as torch.optim.Adam(weight_decay=gamma) in the authors' code), on the step's tasks."""
    xi = state["xi"][tasks]
    z = torch.softmax(xi, 0)
    delta = (before + FAMO_EPS).log() - (after + FAMO_EPS).log()
    grad = z * delta - z * (z @ delta) + cfg.famo_decay * xi
    b1, b2, eps = 0.9, 0.999, 1e-8
    t = state["t"][tasks] + 1
    m = b1 * state["m"][tasks] + (1 - b1) * grad
    v = b2 * state["v"][tasks] + (1 - b2) * grad * grad
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    state["xi"][tasks] = xi - cfg.famo_lr * m_hat / (v_hat.sqrt() + eps)
    state["m"][tasks], state["v"][tasks], state["t"][tasks] = m, v, t


LOG_EPS = 1e-20  # LibMTL's: log(L + eps) stays finite for a zero loss


def gls_coefficients(losses: torch.Tensor) -> torch.Tensor:
    """d/dL_k of exp(mean_j log L_j) = Gbar / (k L_k)."""
    logs = (losses + LOG_EPS).log()
    return logs.mean().exp() / (len(losses) * (losses + LOG_EPS))


def _gls(parts, inputs, state):
    # Weights from the global losses (identical on every rank, the 1-process objective's gradient)
    return _weighted(parts, gls_coefficients(inputs.global_losses()))


def stch_coefficients(losses: torch.Tensor, nadir: torch.Tensor | None, mu: float) -> torch.Tensor:
    """d/dL_k of the step's objective: sum_k log L_k during the warm-up (nadir None), else
    k mu log sum_k exp(log(L_k / z_k) / mu) (the max is subtracted inside the softmax: no overflow)."""
    if nadir is None:
        return 1.0 / (losses + LOG_EPS)
    return len(losses) * torch.softmax((losses / nadir + LOG_EPS).log() / mu, 0) / (losses + LOG_EPS)


def _stch(parts, inputs, state):
    warm = int(state["steps"]) < inputs.cfg.stch_warmup
    nadir = None if warm else state["nadir"][inputs.tasks]
    return _weighted(parts, stch_coefficients(inputs.global_losses(), nadir, inputs.cfg.stch_mu))


def _stch_after(state, tasks, losses, after, cfg) -> None:
    """The warm-up's global losses, summed per task; their mean is the nadir z from then on."""
    if int(state["steps"]) < cfg.stch_warmup:
        state["sum"][tasks] += losses
        state["count"][tasks] += 1
        state["steps"] += 1
        if int(state["steps"]) == cfg.stch_warmup:
            seen = state["count"] > 0
            state["nadir"][seen] = state["sum"][seen] / state["count"][seen]
            state["nadir"][~seen] = 1.0  # a task no warm-up step drew: its losses unscaled


def _zeros(*names):
    return lambda K: {n: torch.zeros(K, dtype=torch.float64) for n in names}


LOSS_WEIGHTINGS: dict[str, LossWeightingSpec] = {
    "sum": LossWeightingSpec(_sum, "the summed losses"),
    "mean": LossWeightingSpec(_mean, "the summed losses divided by the task count"),
    "rlw": LossWeightingSpec(_rlw, "Lin et al. 2022 (random loss weighting; LibMTL's RLW read)"),
    "uw": LossWeightingSpec(_uw, "Kendall et al. 2018 (uncertainty weighting; LibMTL's UW read)", learnable=True),
    "dwa": LossWeightingSpec(_dwa, "Liu et al. 2019 (dynamic weight average)",
                             init_state=lambda K: {**_zeros("sum", "count", "prev1", "prev2")(K),
                                                   "steps": torch.zeros((), dtype=torch.float64)},
                             after_step=_dwa_after),
    "famo": LossWeightingSpec(_famo, "Liu et al. 2023 (FAMO; the authors' code read)",
                              init_state=_zeros("xi", "m", "v", "t"), after_step=_famo_after, reevaluate=True),
    "gls": LossWeightingSpec(_gls, "Chennupati et al. 2019 (geometric loss strategy; LibMTL's GLS read)"),
    "stch": LossWeightingSpec(_stch, "Lin et al. 2024 (smooth Tchebycheff scalarisation; LibMTL's and the "
                                     "authors' STCH read)",
                              init_state=lambda K: {**_zeros("sum", "count", "nadir")(K),
                                                    "steps": torch.zeros((), dtype=torch.float64)},
                              after_step=_stch_after),
}


def has_learnable_weights(name: str) -> bool:
    """The method adds ``loss_log_vars`` to the model (UW)."""
    return name in LOSS_WEIGHTINGS and LOSS_WEIGHTINGS[name].learnable


def initial_state(name: str, K: int) -> State:
    spec = LOSS_WEIGHTINGS[name]
    return spec.init_state(K) if spec.init_state else {}
