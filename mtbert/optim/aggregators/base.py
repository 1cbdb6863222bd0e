"""What every aggregator receives and how it is described.

An aggregator maps the Gram matrices of the step's per-task gradients to the weights of one
or more updates: ``update = w @ G``. Its inputs are identical on every rank (the Gram is
all-reduced, the generator seeded from (seed, step)), and so is its state: computed from those
inputs only, never from a rank-local value, and saved in every checkpoint.

Shapes: k = the step's tasks (a subset of the run's K under probabilistic schedules), L = the
number of parameter blocks of the block Gram (1 unless ``method.gram_blocks`` asks for more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class GramInputs:
    gram: torch.Tensor
    """[L, k, k] float64 on the host: one Gram per parameter block (their sum is the full Gram)."""
    tasks: torch.Tensor
    """[k] long: the step's tasks as indexes into the run's K tasks (states are over all K)."""
    generator: torch.Generator | None
    """Seeded from (seed, step): identical on every rank (PCGrad/GradVac orders, RLW draws)."""
    cfg: object
    """The run's MethodCfg (hyper-parameters)."""
    global_losses: Callable[[], torch.Tensor] | None = None
    """-> [k] float64: the step's global task losses (one all-reduce of k floats; only when asked:
    GradNorm, DB-MTL)."""
    column_state: dict | None = None
    """A coordinate-wise method's per-coordinate state: name -> [K, n] beside this rank's rows."""
    sum_partials: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    """Sums over this rank's columns -> sums over every coordinate (identity where each rank holds
    whole rows; an all-reduce where it holds a shard, partitions or columns)."""


State = dict  # name -> float64 tensor over all K tasks (and L blocks); JSON-saved in checkpoints
WeightFn = Callable[[GramInputs, State], list]


ColumnFn = Callable[[torch.Tensor, "torch.Tensor | None", GramInputs, dict], torch.Tensor]


@dataclass(frozen=True)
class AggregatorSpec:
    fn: WeightFn | None
    """(inputs, state) -> list of [L, k] float64 weights, one per update (GSE makes two); may
    update ``state`` in place. None for a coordinate-wise method (``columns``)."""
    source: str
    """Paper (and the reference implementation read) it follows."""
    init_state: Callable[[int, int], State] | None = None
    """(K, L) -> the state before the first step; None: stateless."""
    blocks: bool = True
    """Accepts a block Gram (L > 1): per-block weights (per-layer PCGrad, GradVac's targets)."""
    columns: ColumnFn | None = None
    """A coordinate-wise method (not a function of the Gram): (rows [k, n] where they lie, their
    global coordinates [n] long (-1: padding), inputs, state) -> the update's [n] values."""
    column_state: Callable[[int, int, torch.Tensor], dict] | None = None
    """(K, n, a row) -> per-coordinate state beside the rows (checkpointed by every rank)."""


def per_block(weights_of: Callable[[torch.Tensor, GramInputs], torch.Tensor]) -> WeightFn:
    """A method defined on one [k, k] Gram, applied to each block's Gram: -> [[L, k]]."""
    def fn(inputs: GramInputs, state: State) -> list:
        return [torch.stack([weights_of(g, inputs) for g in inputs.gram])]
    return fn


def scale_free_tol(gram: torch.Tensor) -> float:
    """Eigenvalues below this count as zero (numpy's matrix_rank rule, in float64)."""
    return float(gram.diagonal().abs().max().clamp(min=1e-300)) * gram.shape[-1] * torch.finfo(torch.float64).eps


def state_to_json(state: State) -> dict:
    """A method state for trainer_state.json; exact (a Python float round-trips a float64)."""
    return {k: {"shape": list(v.shape), "values": v.reshape(-1).tolist()} for k, v in state.items()}


def state_from_json(saved: dict) -> State:
    return {k: torch.tensor(v["values"], dtype=torch.float64).reshape(v["shape"]) for k, v in saved.items()}
