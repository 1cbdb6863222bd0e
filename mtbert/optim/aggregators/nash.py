"""Nash-MTL (Navon et al. 2022): the update d = G^T a whose weights solve the bargaining
condition  M a = 1 / a  (elementwise, a > 0; M = G G^T), i.e. every task's utility g_i . d
is 1 / a_i.

That condition is the stationarity of the strictly convex  f(a) = a^T M a / 2 - sum log a_i,
so it is solved here by damped Newton steps to machine precision (f's Hessian is
M + diag(1 / a^2)); the authors' code instead runs 20 iterations of a convex-concave
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


def nash_weights(gram: torch.Tensor, start: torch.Tensor | None = None, iters: int = 100) -> torch.Tensor:
    M = gram.double()
    k = M.shape[0]
    M = M + 1e-10 * M.trace().clamp(min=1e-300) / k * torch.eye(k, dtype=torch.float64)
    a = start.clone() if start is not None and bool((start > 0).all()) else M.diagonal().rsqrt()

    def f(x):
        return 0.5 * x @ M @ x - x.log().sum()

    def residual(x):  # (M x)_i x_i - 1: scale-free, zero at the solution
        return float(((M @ x) * x - 1).abs().max())

    for _ in range(iters):
        grad = M @ a - 1 / a
        r = residual(a)
        if r < 1e-14:
            break
        step = torch.linalg.solve(M + torch.diag(1 / a ** 2), grad)
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


def _nash(inputs: GramInputs, state) -> list:
    idx = inputs.tasks
    prev = state["alpha"][idx]
    a = nash_weights(inputs.gram[0], prev if bool((prev > 0).all()) else None)
    state["alpha"][idx] = a
    return [a[None, :]]


SPECS = {
    "nash_mtl": AggregatorSpec(_nash, "Navon et al. 2022 (Nash-MTL; bargaining condition solved by Newton)",
                               init_state=lambda K, L: {"alpha": torch.zeros(K, dtype=torch.float64)},
                               blocks=False),
}
