"""Closed-form methods on the K x K Gram matrix M = G G^T: IMTL-G (Liu et al. 2021) and
Aligned-MTL (Senushkin et al. 2023)."""

from __future__ import annotations

import warnings

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, per_block, scale_free_tol


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning", Sec. 3.2): the update
    d = G^T a has equal projections c on every task's unit gradient u_i, scaled by sum(a) = 1.
    The paper's closed form a_{2:K} = g_1 U^T (D U^T)^{-1} (D = rows g_1 - g_i, U = rows
    u_1 - u_i) is the same d as U d = 1 solved on the unit gradients: with the cosine matrix
    C = U U^T = M / (n n^T) (n_i = ||g_i||), d = U^T C^{-1} 1, i.e. a ∝ C^{-1} 1 / n.

    With linearly dependent task gradients (rank-deficient M) the closed form's inverse does not
    exist and d = 0 satisfies "equal projections" with sum(a) = 1: a solve returned that silent
    zero step. Here C^+ (the pseudo-inverse) gives the minimum-norm least-squares d of U d = 1:
    equal positive projections where they exist (a dependent gradient inside the others' cone),
    the closest ones otherwise, never 0. A task with a zero gradient has no unit vector: weight 0."""
    M = gram.double()
    k = M.shape[0]
    alive = M.diagonal() > scale_free_tol(M)
    a = torch.zeros(k, dtype=torch.float64)
    if not alive.any():
        return a
    idx = alive.nonzero().flatten()
    n = M.diagonal()[idx].sqrt()
    C = M[idx][:, idx] / (n[:, None] * n[None, :])
    b = torch.linalg.pinv(C, hermitian=True, rtol=len(idx) * 64 * torch.finfo(torch.float64).eps) @ C.new_ones(len(idx))
    w = b / n
    total = w.sum()
    if not bool(total > 1e-9 * w.abs().sum()):
        # sum(a) = 1 cannot scale a direction of positive projections (the unit gradients cancel:
        # C^+ 1 ~ 0, or the solution's weights sum to <= 0): the mean gradient, said once
        warnings.warn("imtl_g: no update has equal positive projections on these task gradients (they cancel); "
                      "this step uses the mean gradient", RuntimeWarning, stacklevel=2)
        a[idx] = 1.0 / len(idx)
        return a
    a[idx] = w / total  # the paper's scale (sum(a) = 1)
    return a


def aligned_mtl_weights(gram: torch.Tensor) -> torch.Tensor:
    """Aligned-MTL (Senushkin et al. 2023, Alg. 1): with M = V diag(lambda) V^T over the nonzero
    eigenvalues, the aligned gradients are G_hat = sqrt(lambda_min) V diag(lambda)^(-1/2) V^T G
    (equal singular values, sqrt(lambda_min)); with unit task weights the update is 1^T G_hat,
    i.e. w = B^T 1 for B = sqrt(lambda_min) V diag(lambda)^(-1/2) V^T (LibMTL's form)."""
    M = gram.double()
    lam, V = torch.linalg.eigh(M)
    keep = lam > scale_free_tol(M)
    if not keep.any():
        return torch.zeros(M.shape[0], dtype=torch.float64)
    lam, V = lam[keep], V[:, keep]
    B = lam.min().sqrt() * (V / lam.sqrt()[None, :]) @ V.T
    return B.sum(0)


def _imtl_g(gram, inputs: GramInputs):
    return imtl_g_weights(gram)


def _aligned(gram, inputs: GramInputs):
    return aligned_mtl_weights(gram)


SPECS = {
    "imtl_g": AggregatorSpec(per_block(_imtl_g), "Liu et al. 2021 (IMTL-G, closed form)"),
    "aligned_mtl": AggregatorSpec(per_block(_aligned), "Senushkin et al. 2023 (Aligned-MTL, eigendecomposition)"),
}
