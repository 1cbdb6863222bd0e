"""Aggregators: the step's per-task Gram matrices (and, for some, a small state) -> the
weights of one or more updates, ``update = w @ G``. A registry is a plain dict of specs.

Every rank calls the aggregator on the same (all-reduced) Gram with a generator seeded from
(seed, step), and updates its state from those inputs alone, so every rank gets the same
weights and keeps the same state without communicating.

    projection.py   pcgrad, gse, gradvac (stateful: EMA targets per task pair and block)
    min_norm.py     mgda, cagrad, upgrad, dualproj (small QPs: scipy)
    closed_form.py  imtl_g, aligned_mtl
    nash.py         nash_mtl, fairgrad (stateful: warm start)
    conditioned.py  config, pcd (stateful: the gradients' norm EMA)
    stochastic.py   sdmgrad, modo, cr_mogm, gradnorm (stateful: the weights)
    robust.py       krum; trimmed_mean, graddrop (coordinate-wise: ``columns``, not weights)
    tracking.py     excess_mtl, moco, db_mtl (coordinate-wise with per-coordinate state beside the rows)
The loss-weighting methods (rlw, uw, dwa, famo, gls, stch) need no per-task gradients:
optim/loss_weighting.py.
"""

from __future__ import annotations

import torch

from mtbert.optim.aggregators import closed_form, conditioned, min_norm, nash, projection, robust, stochastic, tracking
from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, State


def _ones(scale):
    def fn(inputs: GramInputs, state) -> list:
        L, k, _ = inputs.gram.shape
        return [torch.full((L, k), 1.0 / k if scale == "mean" else 1.0, dtype=torch.float64)]
    return fn


AGGREGATORS: dict[str, AggregatorSpec] = {}
AGGREGATORS.update({
    "sum": AggregatorSpec(_ones("sum"), "summed losses (per-task path: for tests and benchmarks)"),
    "mean": AggregatorSpec(_ones("mean"), "mean of the task gradients"),
    **projection.SPECS, **min_norm.SPECS, **closed_form.SPECS, **nash.SPECS, **conditioned.SPECS,
    **stochastic.specs(AGGREGATORS), **robust.SPECS, **tracking.SPECS,
})


def initial_state(name: str, K: int, L: int) -> State:
    spec = AGGREGATORS[name]
    return spec.init_state(K, L) if spec.init_state else {}


def aggregate(name: str, inputs: GramInputs, state: State) -> list[torch.Tensor]:
    """-> one [L, k] float64 weight tensor per update (GSE: two)."""
    return AGGREGATORS[name].fn(inputs, state)


def update_weights(name: str, gram: torch.Tensor, generator=None, reduction: str = "sum", cfg=None,
                   state: State | None = None, losses: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One [k, k] Gram (one block, every task present) -> [k] weights per update."""
    from mtbert.config.schema import MethodCfg
    cfg = cfg or MethodCfg(name=name, pcgrad_reduction=reduction)
    k = gram.shape[0]
    state = initial_state(name, k, 1) if state is None else state
    inputs = GramInputs(gram.double()[None], torch.arange(k), generator, cfg,
                        (lambda: losses.double()) if losses is not None else None)
    return [w[0] for w in aggregate(name, inputs, state)]


def combine_columns(name: str, rows: torch.Tensor, coords: torch.Tensor | None, inputs: GramInputs,
                    state: State) -> torch.Tensor:
    """A coordinate-wise method's update values on the rows where they lie: [k, n] -> [n]."""
    return AGGREGATORS[name].columns(rows, coords, inputs, state)


def initial_column_state(name: str, K: int, n: int, like: torch.Tensor) -> dict:
    """Per-coordinate state beside ``n`` columns of rows like ``like`` (empty: none)."""
    spec = AGGREGATORS.get(name)
    return spec.column_state(K, n, like) if spec is not None and spec.column_state else {}


def is_coordinate_wise(name: str) -> bool:
    return name in AGGREGATORS and AGGREGATORS[name].columns is not None


def conflict_stats(gram: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Pairwise gradient cosines, fraction of task pairs in conflict, and the norm of the
    update relative to the plain sum (seed "MiniBERT: Training Jointly"). gram: [k, k] or block
    Grams [L, k, k]; w: [k] or per-block [L, k]."""
    blocks = gram if gram.dim() == 3 else gram[None]
    w = w if w.dim() == 2 else w[None].expand(blocks.shape[0], -1)
    full = blocks.sum(0)
    K = full.shape[0]
    norms = full.diagonal().clamp(min=0).sqrt()
    cos = full / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    iu = torch.triu_indices(K, K, 1)
    pair_cos = cos[iu[0], iu[1]]
    ones = torch.ones(K, dtype=torch.float64)
    sum_norm = (ones @ full @ ones).clamp(min=0).sqrt()
    upd_norm = torch.einsum("lk,lkm,lm->", w, blocks, w).clamp(min=0).sqrt()
    return {"conflict_frac": float((pair_cos < 0).double().mean()) if len(pair_cos) else 0.0,
            "cos_min": float(pair_cos.min()) if len(pair_cos) else 1.0,
            "cos_mean": float(pair_cos.mean()) if len(pair_cos) else 1.0,
            "norm_ratio": float(upd_norm / sum_norm.clamp(min=1e-30))}


__all__ = ["AGGREGATORS", "AggregatorSpec", "GramInputs", "aggregate", "combine_columns", "conflict_stats",
           "initial_column_state", "initial_state", "is_coordinate_wise", "update_weights"]
