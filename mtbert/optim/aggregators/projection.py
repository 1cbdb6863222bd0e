"""Projection methods: PCGrad (Yu et al. 2020), GSE (a minBERT seed report), GradVac (Wang et
al. 2021). Each projected gradient is a linear combination of the original ones,
g_i' = sum_m C[i, m] g_m, so the coefficients C -- and the weights w = 1^T C -- follow from
the Gram matrix alone (optim/pcgrad.py explains PCGrad's)."""

from __future__ import annotations

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, per_block
from mtbert.optim.pcgrad import _orders, pcgrad_weights


def _pcgrad(gram, inputs: GramInputs):
    return pcgrad_weights(gram, inputs.generator, inputs.cfg.pcgrad_reduction)


def _gse(inputs: GramInputs, state) -> list:
    # Seed "An Exploration of Fine-Tuning Techniques on minBERT": first an update with the mean
    # of the projected gradients, then one with the plain combined (summed) gradient of the
    # same batches (gradients are not recomputed in between).
    L, k, _ = inputs.gram.shape
    first = torch.stack([pcgrad_weights(g, inputs.generator, "mean") for g in inputs.gram])
    return [first, torch.ones(L, k, dtype=torch.float64)]


def _gradvac(inputs: GramInputs, state) -> list:
    """GradVac, Wang et al. 2021, Alg. 1, per block b: for each task i, visit the other tasks j
    in a random order; phi = cos(g_i', g_j) with the current g_i' and the original g_j; if
    phi < target[i, j]:
        g_i' += ||g_i'|| (t sqrt(1 - phi^2) - phi sqrt(1 - t^2)) / (||g_j|| sqrt(1 - t^2)) g_j
    and the target always moves: target[i, j] <- (1 - beta) target[i, j] + beta phi.
    The targets start at 0 (the paper) and live in the state as [L, K, K]."""
    beta, eps = inputs.cfg.gradvac_beta, 1e-8
    target = state["target"]  # [L, K, K], over all of the run's tasks
    idx = inputs.tasks.tolist()
    out = []
    for b, gram in enumerate(inputs.gram):
        k = gram.shape[0]
        C = torch.eye(k, dtype=torch.float64)
        norms = gram.diagonal().clamp(min=0).sqrt()
        for i, order in enumerate(_orders(k, inputs.generator)):
            for j in order:
                gi_norm = (C[i] @ gram @ C[i]).clamp(min=0).sqrt()
                phi = (C[i] @ gram[:, j]) / (gi_norm * norms[j] + eps)
                t = target[b, idx[i], idx[j]]
                if phi < t:
                    C[i, j] += gi_norm * (t * (1 - phi ** 2).clamp(min=0).sqrt() - phi * (1 - t ** 2).sqrt()) / (
                        norms[j] * (1 - t ** 2).sqrt() + eps)
                target[b, idx[i], idx[j]] = (1 - beta) * t + beta * phi
        out.append(C.sum(0))
    return [torch.stack(out)]


SPECS = {
    "pcgrad": AggregatorSpec(per_block(_pcgrad), "Yu et al. 2020, Algorithm 1"),
    "gse": AggregatorSpec(_gse, "seed 'An Exploration of Fine-Tuning Techniques on minBERT'"),
    "gradvac": AggregatorSpec(
        _gradvac, "Wang et al. 2021, Algorithm 1 (LibMTL's GradVac read)",
        init_state=lambda K, L: {"target": torch.zeros(L, K, K, dtype=torch.float64)}),
}
