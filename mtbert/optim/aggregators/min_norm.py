"""Methods that solve a small convex problem over the step's K x K Gram matrix M = G G^T:
MGDA (Sener & Koltun 2018), UPGrad and DualProj (Quinton & Rey 2024, torchjd), CAGrad (Liu et
al. 2021). Solved in float64 on the host with scipy: the problems are K-dimensional.

MGDA, UPGrad and DualProj are non-negative least squares in disguise, so they are solved
exactly (Lawson-Hanson active set, ``scipy.optimize.nnls``) rather than by Frank-Wolfe
iterations (Sener & Koltun's code) or a regularised QP (torchjd): for a factor R with
R^T R = M (from the eigendecomposition; R is rank x K), ||R v||^2 = ||G^T v||^2.
"""

from __future__ import annotations

import numpy as np
import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, per_block, scale_free_tol


def _factor(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M (PSD) -> (R [r, K] with R^T R = M, eigenvalues [r], eigenvectors [K, r]) over the
    eigenvalues above the rank tolerance."""
    lam, V = np.linalg.eigh(M)
    keep = lam > scale_free_tol(torch.from_numpy(M))
    lam, V = lam[keep], V[:, keep]
    return np.sqrt(lam)[:, None] * V.T, lam, V


def _nnls(R: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls
    if R.shape[0] == 0:
        return np.zeros(R.shape[1])
    return nnls(R, b, maxiter=50 * R.shape[1])[0]


def mgda_weights(gram: torch.Tensor) -> torch.Tensor:
    """The min-norm point of the convex hull of the task gradients: argmin_{w in simplex} w^T M w.
    Exact: z = argmin_{z >= 0} ||G^T z||^2 + (1^T z - 1)^2 is the min-norm point scaled by
    1 / (1 + ||x*||^2) (along any ray z = a w the best a is 1 / (1 + ||G^T w||^2), leaving
    ||G^T w||^2 / (1 + ||G^T w||^2), increasing in ||G^T w||), so w = z / 1^T z. As an NNLS:
    R^T R = M + 1 1^T, R^T b = 1."""
    M = gram.double().numpy()
    k = M.shape[0]
    R, lam, V = _factor(M + np.ones((k, k)))
    b = (V.T @ np.ones(k)) / np.sqrt(lam)
    z = _nnls(R, b)
    return torch.from_numpy(z / z.sum())


def _dual_cone_weights(gram: torch.Tensor, prefs: np.ndarray) -> np.ndarray:
    """For each row u of prefs: the weights v of the projection of G^T u onto the dual cone
    {x : G x >= 0} of the task gradients, v = argmin_{v >= u} v^T M v (torchjd's
    ``project_weights``, Quinton & Rey 2024, Prop. 1). With v = u + z, z >= 0:
    min ||R z + R u||^2, an NNLS. -> [rows, K]."""
    R, _, _ = _factor(gram.double().numpy())
    return np.stack([u + _nnls(R, -R @ u) for u in prefs])


def upgrad_weights(gram: torch.Tensor) -> torch.Tensor:
    """UPGrad: the mean of each task gradient's projection onto the dual cone (torchjd's default
    preference, the mean: u_i = e_i / K). torchjd normalises and regularises the Gram (1e-4)
    before solving; this solves the unregularised problem of the paper (exact when M is
    singular too: the NNLS works on the rank-r factor)."""
    k = gram.shape[0]
    return torch.from_numpy(_dual_cone_weights(gram, np.eye(k) / k).sum(0))


def dualproj_weights(gram: torch.Tensor) -> torch.Tensor:
    """DualProj: the mean gradient projected onto the dual cone (v >= 1/K)."""
    k = gram.shape[0]
    return torch.from_numpy(_dual_cone_weights(gram, np.full((1, k), 1.0 / k))[0])


def cagrad_weights(gram: torch.Tensor, c: float, rescale: int = 1) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, Alg. 1): d = g0 + (sqrt(phi) / ||g_w||) g_w with g0 the mean
    gradient, phi = c^2 ||g0||^2 and w = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||.
    Like the authors' code: SLSQP on the simplex from its centre and ``rescale`` 1 divides d by
    1 + c^2; unlike it, with the exact gradient of the objective and tolerance 1e-14 (their
    default tolerance leaves ~1e-4 in w). -> weights of d: 1/K + lambda w."""
    from scipy.optimize import minimize
    M = gram.double().numpy()
    k = M.shape[0]
    a = M.mean(1)  # M (1/K): g_m . g0
    g0_norm = np.sqrt(max(M.mean(), 0.0))
    s = c * g0_norm  # sqrt(phi)
    if g0_norm == 0.0 or k == 1:
        w = np.full(k, 1.0 / k)
    else:
        def f(w):
            n = np.sqrt(max(w @ M @ w, 1e-300))
            return w @ a + s * n, a + s * (M @ w) / n
        res = minimize(f, np.full(k, 1.0 / k), jac=True, method="SLSQP", bounds=[(0, 1)] * k,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(k)}],
                       options={"ftol": 1e-14, "maxiter": 1000})
        w = np.clip(res.x, 0, None)
        w = w / w.sum()
    gw_norm = np.sqrt(max(w @ M @ w, 0.0))
    lam = s / gw_norm if gw_norm > 0 else 0.0
    d = np.full(k, 1.0 / k) + lam * w
    return torch.from_numpy(d / (1 + c ** 2) if rescale == 1 else d / (1 + c) if rescale == 2 else d)


def _mgda(gram, inputs: GramInputs):
    return mgda_weights(gram)


def _upgrad(gram, inputs: GramInputs):
    return upgrad_weights(gram)


def _dualproj(gram, inputs: GramInputs):
    return dualproj_weights(gram)


def _cagrad(gram, inputs: GramInputs):
    return cagrad_weights(gram, inputs.cfg.cagrad_c, inputs.cfg.cagrad_rescale)


SPECS = {
    "mgda": AggregatorSpec(per_block(_mgda), "Sener & Koltun 2018 (MGDA: min-norm point, exact for any K)"),
    "cagrad": AggregatorSpec(per_block(_cagrad), "Liu et al. 2021 (CAGrad, Algorithm 1; authors' code read)"),
    "upgrad": AggregatorSpec(per_block(_upgrad), "Quinton & Rey 2024 (torchjd UPGrad)"),
    "dualproj": AggregatorSpec(per_block(_dualproj), "Quinton & Rey 2024 (torchjd DualProj)"),
}
