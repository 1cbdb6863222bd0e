"""Aggregators: each maps the K x K Gram matrix of per-task gradients to the weights of one
or more updates (``update = w @ G``). A registry is a plain dict.

Every rank calls the aggregator on the same (all-reduced) Gram matrix with a generator
seeded from (seed, step), so every rank gets the same weights without communicating.
"""

from __future__ import annotations

import torch

from mtbert.optim.pcgrad import pcgrad_weights


def _sum(gram, gen, reduction):
    return [torch.ones(gram.shape[0], dtype=torch.float64)]


def _mean(gram, gen, reduction):
    return [torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64)]


def _pcgrad(gram, gen, reduction):
    return [pcgrad_weights(gram, gen, reduction)]


def _gse(gram, gen, reduction):
    # Seed "An Exploration of Fine-Tuning Techniques on minBERT": first an update with the mean
    # of the projected gradients, then one with the plain combined (summed) gradient of the
    # same batches (gradients are not recomputed in between).
    return [pcgrad_weights(gram, gen, "mean"), torch.ones(gram.shape[0], dtype=torch.float64)]


AGGREGATORS = {"sum": _sum, "mean": _mean, "pcgrad": _pcgrad, "gse": _gse}


def update_weights(name: str, gram: torch.Tensor, generator=None, reduction: str = "sum") -> list[torch.Tensor]:
    return AGGREGATORS[name](gram, generator, reduction)


def conflict_stats(gram: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Pairwise gradient cosines, fraction of task pairs in conflict, and the norm of the
    update relative to the plain sum (seed "MiniBERT: Training Jointly")."""
    K = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    iu = torch.triu_indices(K, K, 1)
    pair_cos = cos[iu[0], iu[1]]
    ones = torch.ones(K, dtype=torch.float64)
    sum_norm = (ones @ gram @ ones).clamp(min=0).sqrt()
    upd_norm = (w @ gram @ w).clamp(min=0).sqrt()
    out = {"conflict_frac": float((pair_cos < 0).double().mean()) if len(pair_cos) else 0.0,
           "cos_min": float(pair_cos.min()) if len(pair_cos) else 1.0,
           "cos_mean": float(pair_cos.mean()) if len(pair_cos) else 1.0,
           "norm_ratio": float(upd_norm / sum_norm.clamp(min=1e-30))}
    return out
