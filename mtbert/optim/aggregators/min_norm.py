"""Methods that solve a small convex problem over the step's K x K Gram matrix M = G G^T:
MGDA (Sener & Koltun 2018), UPGrad and DualProj (Quinton & Rey 2024, torchjd), CAGrad (Liu et
al. 2021). Solved in float64 on the host with scipy: the problems are K-dimensional.

MGDA, UPGrad and DualProj are non-negative least squares in disguise, so they are solved
exactly (Lawson-Hanson active set, ``scipy.optimize.nnls``) rather than by Frank-Wolfe
iterations (Sener & Koltun's code) or a regularised QP (torchjd): for a factor R with
R^T R = M (from the eigendecomposition; R is rank x K), ||R v||^2 = ||G^T v||^2.
"""

from __future__ import annotations

import itertools

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


def _cagrad_inner(R: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """argmin over the simplex of F(w) = b . x + s ||x||, x = R w (R [r, K]: the factor of the
    Gram, so x is g_w in r coordinates and b is g0), exactly, by the faces of the hull.

    F is convex and smooth away from x = 0, so its minimiser x* != 0 is the stationary point of F
    on the affine hull of the face whose relative interior holds it; by Caratheodory that face
    can be taken as a simplex of affinely independent gradients S. On A_S = x0 + D (x0 the point
    of A_S nearest the origin, D its direction space), stationarity P_D(b + s x / ||x||) = 0
    has the closed form x = x0 - t q with q = P_D b / s and t = ||x0|| / sqrt(1 - ||q||^2) (no
    stationary point when ||q|| >= 1). Every S is tried (2^K - 1 of them: 63 for K = 6) and the
    feasible candidate of least F is kept; x = 0 (F = 0) is a candidate when 0 is in the hull.
    -> w [K]."""
    r, k = R.shape
    cands = []  # (F, w)
    for size in range(1, k + 1):
        for S in itertools.combinations(range(k), size):
            P = R[:, S]
            Q = np.zeros((r, 0))
            if size > 1:
                U, sv, _ = np.linalg.svd(P[:, 1:] - P[:, :1], full_matrices=False)
                if sv.min() <= sv.max() * max(r, size) * np.finfo(float).eps * 16:
                    continue  # affinely dependent: its points lie on a smaller face
                Q = U
            q = Q @ (Q.T @ b) / s
            nq = float(np.linalg.norm(q))
            x0 = P[:, 0] - Q @ (Q.T @ P[:, 0])
            n0 = float(np.linalg.norm(x0))
            if nq >= 1 or n0 == 0:
                continue
            x = x0 - q * (n0 / np.sqrt(1 - nq * nq))
            w = np.linalg.lstsq(np.vstack([P, np.ones((1, size))]), np.append(x, 1.0), rcond=None)[0]
            if (w < -1e-9).any():
                continue  # outside the face
            full = np.zeros(k)
            full[list(S)] = np.clip(w, 0, None) / np.clip(w, 0, None).sum()
            xf = R @ full
            cands.append((float(b @ xf + s * np.linalg.norm(xf)), full))
    zero = mgda_weights(torch.from_numpy(R.T @ R)).numpy()  # the min-norm point of the hull
    if np.linalg.norm(R @ zero) <= 1e-9 * np.abs(R).max() * np.sqrt(k):
        cands.append((0.0, zero))
    return min(cands, key=lambda c: c[0])[1]


def cagrad_weights(gram: torch.Tensor, c: float, rescale: int = 1) -> torch.Tensor:
    """CAGrad (Liu et al. 2021, Alg. 1): d = g0 + (sqrt(phi) / ||g_w||) g_w with g0 the mean
    gradient, phi = c^2 ||g0||^2 and w = argmin_{w in simplex} g_w . g0 + sqrt(phi) ||g_w||;
    ``rescale`` 1 divides d by 1 + c^2 (the authors' default), 2 by 1 + c, 0 not at all.
    The authors solve the inner problem with SLSQP from the simplex centre; that leaves ~1e-4 in
    w at their tolerance and, on badly scaled or rank-deficient Grams, stops far from the optimum
    even at 1e-14 (2026-12-07: objective off by up to 1.4 ||g0||^2 on random Grams with norms
    spread 100x). Here it is solved exactly (``_cagrad_inner``). -> weights of d: 1/K + lambda w."""
    M = gram.double().numpy()
    k = M.shape[0]
    R, _, _ = _factor(M)
    u = np.full(k, 1.0 / k)
    b = R @ u  # g0 in the factor's coordinates
    s = c * float(np.linalg.norm(b))  # sqrt(phi)
    w = u if s == 0.0 or k == 1 else _cagrad_inner(R, b, s)
    gw_norm = float(np.linalg.norm(R @ w))
    lam = s / gw_norm if gw_norm > 0 else 0.0
    d = u + lam * w
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
