"""Nash-MTL (Navon et al. 2022) and FairGrad (Ban & Ji 2024): the update d = G^T a whose
weights solve  M a = a^(-1/alpha)  (elementwise, a > 0; M = G G^T), i.e. every task's utility
g_i . d is a_i^(-1/alpha): alpha-fair resource allocation, and alpha = 1 is Nash-MTL's
bargaining condition M a = 1 / a. FairGrad's alpha = 0 is the mean gradient.

That condition is the stationarity of the strictly convex  f(a) = a^T M a / 2 - sum log a_i,
so it is solved here by damped Newton steps to machine precision (f's Hessian is
M + diag(1 / a^2)). FairGrad's condition is the stationarity of a^T M a / 2 - sum h(a_i) with
h' = a^(-1/alpha) (concave: the same Newton, Hessian M + diag(a^(-1/alpha-1)) / alpha); the
authors' code (and torchjd's) hands it to scipy's least_squares at tolerance 1e-8. Nash-MTL's
authors' code instead runs 20 iterations of a convex-concave
procedure with cvxpy and stops early. The state is the previous step's a, the warm start
(the paper carries it between steps too), so the solve takes a few iterations.

Known deviations of the authors' code, where this follows the paper: they divide M by its
Frobenius norm before solving and use the resulting a as is, which scales the update by
sqrt(||M||_F); the paper's a makes ||d||^2 = a^T M a = K. A ridge of 1e-10 trace(M)/K keeps f
bounded below when gradients are linearly dependent (then the paper's condition has no
solution).
"""

from __future__ import annotations

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs

RIDGE = 1e-10  # of the mean squared gradient norm: f bounded below with dependent gradients


def ridged(gram: torch.Tensor) -> torch.Tensor:
    M = gram.double()
    k = M.shape[0]
    return M + RIDGE * M.trace().clamp(min=1e-300) / k * torch.eye(k, dtype=torch.float64)


def fair_weights(gram: torch.Tensor, alpha: float = 1.0, start: torch.Tensor | None = None,
                 iters: int = 100) -> torch.Tensor:
    """a > 0 with (M a)_i = a_i^(-1/alpha) (alpha > 0; alpha = 1: Nash-MTL)."""
    M = ridged(gram)
    a = start.clone() if start is not None and bool((start > 0).all()) else M.diagonal().rsqrt()
    p = 1.0 / alpha

    def f(x):  # a^T M a / 2 - sum h(a), h' = a^-p
        h = x.log() if p == 1 else x.pow(1 - p) / (1 - p)
        return 0.5 * x @ M @ x - h.sum()

    def residual(x):  # (M x)_i x_i^p - 1: scale-free, zero at the solution
        return float(((M @ x) * x.pow(p) - 1).abs().max())

    for _ in range(iters):
        grad = M @ a - a.pow(-p)
        r = residual(a)
        if r < 1e-14:
            break
        step = torch.linalg.solve(M + torch.diag(p * a.pow(-p - 1)), grad)
        t, fa = 1.0, f(a)
        # Armijo on f far from the solution; near it f's rounding (~1e-16 |f|) hides the decrease,
        # so a step that shrinks the residual is taken too: otherwise the solve stalls at ~1e-10
        # and a warm start would stop somewhere else than a cold one.
        while bool((a - t * step <= 0).any()) or (f(a - t * step) > fa - 1e-4 * t * (grad @ step)
                                                  and residual(a - t * step) >= r):
            t *= 0.5
            if t < 1e-12:
                break
        if t < 1e-12:
            break
        a = a - t * step
    return a


def nash_weights(gram: torch.Tensor, start: torch.Tensor | None = None, iters: int = 100) -> torch.Tensor:
    return fair_weights(gram, 1.0, start, iters)


def _nash(inputs: GramInputs, state) -> list:
    idx = inputs.tasks
    prev = state["alpha"][idx]
    a = nash_weights(inputs.gram[0], prev if bool((prev > 0).all()) else None)
    state["alpha"][idx] = a
    return [a[None, :]]


def _fairgrad(inputs: GramInputs, state) -> list:
    alpha, idx = inputs.cfg.fairgrad_alpha, inputs.tasks
    if alpha == 0:
        return [torch.full((1, len(idx)), 1.0 / len(idx), dtype=torch.float64)]
    prev = state["alpha"][idx]
    a = fair_weights(inputs.gram[0], alpha, prev if bool((prev > 0).all()) else None)
    state["alpha"][idx] = a
    return [a[None, :]]


SPECS = {
    "nash_mtl": AggregatorSpec(_nash, "Navon et al. 2022 (Nash-MTL; bargaining condition solved by Newton)",
                               init_state=lambda K, L: {"alpha": torch.zeros(K, dtype=torch.float64)},
                               blocks=False),
    "fairgrad": AggregatorSpec(_fairgrad, "Ban & Ji 2024 (FairGrad: alpha-fair utilities M a = a^(-1/alpha), "
                                          "method.fairgrad_alpha; solved by Newton; the authors' and torchjd's "
                                          "code read)",
                               init_state=lambda K, L: {"alpha": torch.zeros(K, dtype=torch.float64)},
                               blocks=False),
}
