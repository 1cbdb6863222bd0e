"""Updates defined by conditions on their projections onto the task gradients, solved on the
Gram matrix M = G G^T (n_i = ||g_i||, unit gradients u_i = g_i / n_i, cosines C = U U^T =
M / (n n^T)):

- ConFIG (Liu, Chu & Thuerey 2025, Eq. 2; the authors' and torchjd's code read): the direction
  u with equal positive cosines to every task gradient, d_u = U^+ 1 (minimum-norm least
  squares), scaled by the sum of the task gradients' projections on it:
  d = (sum_i g_i . u) u with u = d_u / ||d_u||. In weights: c = N C^+ 1 (N = diag(1 / n)),
  w = (1^T M c / c^T M c) c.
- PCD, priority-constrained descent (Varam & AlHajri 2026; torchjd's and the authors' code
  read): the first task of the step (``data.tasks`` order: put the primary objective first) is
  primary; d is the point closest to its gradient whose projection on every other task's
  gradient keeps at least tau of that gradient's squared norm:
      min_d ||d - g~_1||^2 / 2  s.t.  g~_j . d >= tau ||g~_j||^2   (j >= 2),
  on gradients normalised by an EMA of their squared norms (g~_i = s_i g_i, s_i =
  1 / sqrt(v_i), v an Adam-like bias-corrected EMA of diag(M), beta 0.999: the state), then
  rescaled to the primary gradient's norm. d = g~_1 + sum_j mu_j g~_j with mu >= 0 solved
  exactly over the active sets (k <= 6 tasks: at most 32 small solves); infeasible
  constraints give the primary gradient.
"""

from __future__ import annotations

import itertools

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, per_block, scale_free_tol


def _rtol(k: int) -> float:
    return k * 64 * torch.finfo(torch.float64).eps


def config_weights(gram: torch.Tensor) -> torch.Tensor:
    M = gram.double()
    k = M.shape[0]
    alive = M.diagonal() > scale_free_tol(M)
    inv_n = torch.where(alive, M.diagonal().clamp(min=1e-300).rsqrt(), torch.zeros(k, dtype=torch.float64))
    C = inv_n[:, None] * M * inv_n[None, :]  # cosines (0 for a zero gradient: no unit vector)
    c = inv_n * (torch.linalg.pinv(C, hermitian=True, rtol=_rtol(k)) @ alive.double())
    norm2 = c @ M @ c  # ||d_u||^2
    if not bool(norm2 > 0):
        return torch.zeros(k, dtype=torch.float64)  # every gradient zero
    return (M.sum(0) @ c) / norm2 * c


def _config(gram, inputs: GramInputs):
    return config_weights(gram)


PCD_BETA, PCD_EPS = 0.999, 1e-8


def pcd_solve(Mh: torch.Tensor, tau: float) -> torch.Tensor:
    """Weights w_hat = [1, mu] on the normalised gradients (Gram Mh): the KKT point of the
    projection of g~_1 onto {d : g~_j . d >= tau ||g~_j||^2, j >= 2}, over the active sets by
    size (the QP is convex: a KKT point is its minimum; with dependent gradients several mu give
    the same d). e_1 when no set is feasible."""
    k = Mh.shape[0]
    one = torch.zeros(k, dtype=torch.float64)
    one[0] = 1.0
    if k == 1:
        return one
    b = tau * Mh.diagonal()[1:] - Mh[1:, 0]  # constraint j: (Mh w)_j >= tau Mh_jj, w_1 = 1
    tol = 1e-9 * float(Mh.diagonal().max().clamp(min=1e-300))
    for size in range(k):
        for S in itertools.combinations(range(k - 1), size):
            mu = torch.zeros(k - 1, dtype=torch.float64)
            if S:
                idx = torch.tensor(S)
                A = Mh[1:, 1:][idx][:, idx]
                mu[idx] = torch.linalg.lstsq(A, b[idx][:, None], driver="gelsd").solution[:, 0]
            slack = Mh[1:, 1:] @ mu - b
            if bool((mu >= -tol).all()) and bool((slack >= -tol).all()):
                return torch.cat([one[:1], mu.clamp(min=0)])
    return one  # infeasible (e.g. two secondaries pointing apart): the primary gradient


def pcd_weights(gram: torch.Tensor, scale: torch.Tensor, tau: float) -> torch.Tensor:
    """gram [k, k] (primary first), scale [k] = s_i -> weights on the raw gradients."""
    M = gram.double()
    k = M.shape[0]
    if not bool(M[0, 0] > scale_free_tol(M)):
        return torch.zeros(k, dtype=torch.float64)  # no primary direction
    Mh = scale[:, None] * M * scale[None, :]
    w_hat = pcd_solve(Mh, tau)
    norm2 = w_hat @ Mh @ w_hat
    if not bool(norm2 > 0):
        return torch.zeros(k, dtype=torch.float64)
    return w_hat * scale * (M[0, 0] / norm2).sqrt()  # ||w^T G|| = ||g_1||


def _pcd(inputs: GramInputs, state) -> list:
    idx, M = inputs.tasks, inputs.gram[0]
    state["t"][idx] += 1
    state["v"][idx] = PCD_BETA * state["v"][idx] + (1 - PCD_BETA) * M.diagonal()
    v_hat = state["v"][idx] / (1 - PCD_BETA ** state["t"][idx])
    scale = torch.where(v_hat + PCD_EPS > 0, (v_hat + PCD_EPS).rsqrt(), torch.zeros_like(v_hat))
    return [pcd_weights(M, scale, inputs.cfg.pcd_tau)[None, :]]


SPECS = {
    "config": AggregatorSpec(per_block(_config), "Liu, Chu & Thuerey 2025 (ConFIG: equal positive cosines, "
                                                 "U^+ 1; the authors' and torchjd's code read)"),
    "pcd": AggregatorSpec(_pcd, "Varam & AlHajri 2026 (PCD: priority-constrained descent, the first task "
                                "primary, method.pcd_tau; torchjd's and the authors' code read)",
                          init_state=lambda K, L: {"v": torch.zeros(K, dtype=torch.float64),
                                                   "t": torch.zeros(K, dtype=torch.float64)},
                          blocks=False),
}
