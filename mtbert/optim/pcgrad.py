"""PCGrad (Yu et al. 2020, Algorithm 1) as two pure functions on flat tensors.

For each task i, g_i^PC starts as g_i and is projected, in a random order over the other
tasks j, onto the normal plane of each *original* g_j it conflicts with (g_i^PC . g_j < 0):

    g_i^PC <- g_i^PC - (g_i^PC . g_j) / (||g_j||^2 + eps) g_j

The update is the sum of the g_i^PC (``reduction="mean"`` divides by K).

Every projection subtracts a multiple of an original gradient, so g_i^PC = sum_m C[i, m] g_m:
the coefficients C, and hence the update weights w = 1^T C, follow from the Gram matrix
G G^T alone. That is what lets PCGrad run on gradient shards (each rank holds [K, P/N]
columns; only the K x K partial Gram matrices are all-reduced).
"""

from __future__ import annotations

import torch

EPS = 1e-20  # guards ||g_j||^2 = 0 in float64; a zero g_j never conflicts anyway (dot = 0)


def _orders(K: int, generator: torch.Generator | None) -> list[list[int]]:
    """For each task i, the random order in which the other tasks are visited."""
    return [[j for j in torch.randperm(K, generator=generator).tolist() if j != i] for i in range(K)]


def pcgrad_coefficients(gram: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[K, K] Gram matrix -> [K, K] C with g_i^PC = sum_m C[i, m] g_m (float64)."""
    gram = gram.double()
    K = gram.shape[0]
    C = torch.eye(K, dtype=torch.float64)
    for i, order in enumerate(_orders(K, generator)):
        for j in order:
            dot = C[i] @ gram[:, j]  # g_i^PC . g_j
            if dot < 0:
                C[i, j] -= dot / (gram[j, j] + EPS)
    return C


def pcgrad_weights(gram: torch.Tensor, generator: torch.Generator | None = None,
                   reduction: str = "sum") -> torch.Tensor:
    """[K, K] Gram matrix -> [K] weights w with  update = w @ G."""
    w = pcgrad_coefficients(gram, generator).sum(0)
    return w / gram.shape[0] if reduction == "mean" else w


def gram_matrix(grads: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """G G^T of [K, P] accumulated in float64 over column chunks: fp32 dot products over
    ~10^7 entries lose ~1e-3 relative, float64 accumulation ~1e-7, without a float64 copy of G."""
    K, P = grads.shape
    gram = torch.zeros(K, K, dtype=torch.float64, device=grads.device)
    for s in range(0, P, chunk):
        block = grads[:, s:s + chunk].double()
        gram += block @ block.T
    return gram


def pcgrad(grads: torch.Tensor, generator: torch.Generator | None = None, reduction: str = "sum") -> torch.Tensor:
    """[K, P] per-task gradients -> [P] PCGrad update (same order draws as ``pcgrad_weights``)."""
    w = pcgrad_weights(gram_matrix(grads), generator, reduction)
    return w.to(grads.dtype) @ grads
