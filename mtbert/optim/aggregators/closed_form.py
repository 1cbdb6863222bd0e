"""Closed-form methods on the K x K Gram matrix M = G G^T: IMTL-G (Liu et al. 2021) and
Aligned-MTL (Senushkin et al. 2023)."""

from __future__ import annotations

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, per_block, scale_free_tol


def imtl_g_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021, "Towards Impartial Multi-task Learning", Sec. 3.2): the update
    d = G^T a has equal projections on every task's unit gradient u_i. With D = rows g_1 - g_i,
    U = rows u_1 - u_i (i = 2..K): a_{2:K} = g_1 U^T (D U^T)^{-1}, a_1 = 1 - sum a_{2:K}.
    In Gram terms, with n_i = ||g_i||: g_p . u_q = M[p, q] / n_q."""
    M = gram.double()
    k = M.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    n = M.diagonal().clamp(min=1e-300).sqrt()
    GU = M / n[None, :]  # [p, q] = g_p . u_q
    rest = torch.arange(1, k)
    gU = GU[0, 0] - GU[0, rest]  # g_1 . (u_1 - u_j)
    # (g_1 - g_i) . (u_1 - u_j) for i, j in 2..K
    DU = GU[0, 0] - GU[0, rest][None, :] - GU[rest, 0][:, None] + GU[rest][:, rest]
    a = torch.linalg.solve(DU.T, gU)  # a^T (D U^T) = g_1 U^T
    return torch.cat([1 - a.sum(0, keepdim=True), a])


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
