"""Methods whose weights move a little each step (the state: the weights, over the run's K
tasks; a step's tasks are a subset under probabilistic schedules, their entries are read and
written back). All from the step's Gram M = G G^T:

- SDMGrad (Xiao, Ban & Ji 2023; the authors' and torchjd's code read): w on the simplex
  minimises ||G^T (w + lambda w~)||^2 / 2 with w~ uniform (the direction-oriented
  regulariser), by ``n_iter`` = 20 projected-gradient steps (lr 10, momentum 0.5, warm-started
  from the last step's w) on M scaled by its mean squared norm; the update weights are
  (w + lambda w~) / (1 + lambda), lambda = ``method.sdmgrad_lambda``.
- MoDo (Chen et al. 2023; the authors' and torchjd's code read): one projected-gradient step per
  optimizer step on the same objective, lambda <- P_simplex(lambda - gamma (M + rho I) lambda),
  gamma = ``method.modo_gamma``, rho = ``method.modo_rho``.
- CR-MOGM (Zhou et al. 2022; torchjd's code read): an exponential moving average of another
  method's weights, w_t = alpha w_{t-1} + (1 - alpha) w^_t (``method.cr_mogm_alpha``, the inner
  method ``method.cr_mogm_inner``, a stateless one, MGDA by default as in the paper).
- GradNorm (Chen et al. 2018; torchjd's and LibMTL's code read): learnable task weights w (sum
  K) moved by a gradient step of ``method.gradnorm_lr`` on sum_i |w_i n_i - mean(w n) r_i^a|
  (the target held constant, as in the paper), n_i = ||g_i|| (the Gram's diagonal: every shared
  parameter, not the paper's last shared layer), r_i the task's loss ratio L_i / L_i(0) over
  its mean, a = ``method.gradnorm_alpha``; this step's update uses the weights before the move.

SDMGrad and MoDo are defined on the product of two independent batches' Jacobians (unbiased
stochastic estimates); mtbert has one batch per task per step, so M is the single-batch Gram
(torchjd's weighting accepts either).
"""

from __future__ import annotations

import functools

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs


def simplex_projection(y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (Held et al. 1974; sort-based)."""
    s, _ = torch.sort(y, descending=True)
    cums = s.cumsum(0) - 1
    ks = torch.arange(1, len(y) + 1, dtype=y.dtype)
    rho = int((s - cums / ks > 0).nonzero().max())
    return (y - cums[rho] / (rho + 1)).clamp(min=0)


def _present(state_w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The state's weights of the step's tasks, back on the simplex (uniform at the start)."""
    w = state_w[idx]
    return w / w.sum() if bool(w.sum() > 0) else torch.full_like(w, 1.0 / len(w))


SDM_LR, SDM_MOMENTUM, SDM_ITERS = 10.0, 0.5, 20


def sdmgrad_step(M: torch.Tensor, w: torch.Tensor, lam: float, iters: int = SDM_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (the new simplex weights w, the update weights (w + lam w~) / (1 + lam))."""
    k = M.shape[0]
    pref = torch.full((k,), 1.0 / k, dtype=torch.float64)
    s = M.diagonal().clamp(min=0).sqrt().mean()
    Mh = M / (s * s + 1e-8)
    v = None
    for _ in range(iters):
        grad = Mh @ (w + lam * pref)
        v = grad if v is None else SDM_MOMENTUM * v + grad
        w = simplex_projection(w - SDM_LR * v)
    return w, (w + lam * pref) / (1 + lam)


def _sdmgrad(inputs: GramInputs, state) -> list:
    idx = inputs.tasks
    w, out = sdmgrad_step(inputs.gram[0].double(), _present(state["w"], idx), inputs.cfg.sdmgrad_lambda)
    state["w"][idx] = w
    return [out[None, :]]


def modo_step(M: torch.Tensor, lam: torch.Tensor, gamma: float, rho: float) -> torch.Tensor:
    return simplex_projection(lam - gamma * (M @ lam + rho * lam))


def _modo(inputs: GramInputs, state) -> list:
    idx = inputs.tasks
    lam = modo_step(inputs.gram[0].double(), _present(state["w"], idx), inputs.cfg.modo_gamma, inputs.cfg.modo_rho)
    state["w"][idx] = lam
    return [lam[None, :]]


def _cr_mogm(inputs: GramInputs, state, registry: dict) -> list:
    idx, alpha = inputs.tasks, inputs.cfg.cr_mogm_alpha
    inner = registry[inputs.cfg.cr_mogm_inner].fn(inputs, {})[0][0]  # a stateless method (config/validate.py checks)
    seen = state["seen"][idx] > 0
    w = torch.where(seen, alpha * state["w"][idx] + (1 - alpha) * inner, inner)  # w_0 = the first inner weights
    state["w"][idx], state["seen"][idx] = w, 1.0
    return [w[None, :]]


def gradnorm_move(w: torch.Tensor, norms: torch.Tensor, ratios: torch.Tensor, alpha: float, lr: float) -> torch.Tensor:
    """One step on sum_i |w_i n_i - target_i|, target = mean(w n) r^alpha held constant; then
    back to sum K (the paper's renormalisation; a weight is kept >= 1e-6 of the mean)."""
    G = w * norms
    target = G.mean() * ratios.pow(alpha)
    w = w - lr * torch.sign(G - target) * norms
    k = len(w)
    w = w.clamp(min=1e-6)
    return w * k / w.sum()


def _gradnorm(inputs: GramInputs, state) -> list:
    idx, cfg = inputs.tasks, inputs.cfg
    losses = inputs.global_losses()  # [k] the global batch's task losses
    first = state["L0"][idx] <= 0
    state["L0"][idx] = torch.where(first, losses, state["L0"][idx])
    w = state["w"][idx] * len(idx) / state["w"][idx].sum()  # sum k over the step's tasks
    used = w.clone()
    rel = losses / state["L0"][idx].clamp(min=1e-300)
    ratios = rel / rel.mean().clamp(min=1e-300)
    norms = inputs.gram[0].diagonal().clamp(min=0).sqrt()
    state["w"][idx] = gradnorm_move(w, norms, ratios, cfg.gradnorm_alpha, cfg.gradnorm_lr)
    return [used[None, :]]


def _weights_state(K, L):
    return {"w": torch.zeros(K, dtype=torch.float64)}


def specs(registry: dict) -> dict[str, AggregatorSpec]:
    """This module's entries. CR-MOGM averages another entry's weights, so the package's registry
    (``AGGREGATORS``) is handed in: this module does not import the package that imports it."""
    cr_mogm = AggregatorSpec(functools.partial(_cr_mogm, registry=registry),
                             "Zhou et al. 2022 (CR-MOGM: a moving average of another method's weights, "
                             "method.cr_mogm_inner, method.cr_mogm_alpha; torchjd's code read)",
                             init_state=lambda K, L: {"w": torch.zeros(K, dtype=torch.float64),
                                                      "seen": torch.zeros(K, dtype=torch.float64)},
                             blocks=False)
    return {
        "sdmgrad": AggregatorSpec(_sdmgrad, "Xiao, Ban & Ji 2023 (SDMGrad: direction-oriented MGDA, method.sdmgrad_lambda; "
                                            "the authors' and torchjd's code read)", init_state=_weights_state,
                                  blocks=False),
        "modo": AggregatorSpec(_modo, "Chen et al. 2023 (MoDo: one projected step of the MGDA weights per step, "
                                      "method.modo_gamma, method.modo_rho; the authors' and torchjd's code read)",
                               init_state=_weights_state, blocks=False),
        "cr_mogm": cr_mogm,
        "gradnorm": AggregatorSpec(_gradnorm, "Chen et al. 2018 (GradNorm: learnable weights equalising w_i ||g_i|| "
                                              "at the loss-ratio targets, method.gradnorm_alpha, method.gradnorm_lr; "
                                              "torchjd's and LibMTL's code read)",
                                   init_state=lambda K, L: {"w": torch.ones(K, dtype=torch.float64),
                                                            "L0": torch.zeros(K, dtype=torch.float64)},
                                   blocks=False),
    }
