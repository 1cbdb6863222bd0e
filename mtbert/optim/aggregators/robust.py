"""Robust aggregation, from the Byzantine-tolerant distributed-learning literature, applied to
task gradients (torchjd's code read for all three):

- Krum (Blanchard et al. 2017): each task's score is the sum of squared distances to its
  k - f - 2 nearest other task gradients (f = ``method.krum_byzantine``; from the Gram:
  ||g_i - g_j||^2 = M_ii + M_jj - 2 M_ij); the update is the mean of the ``method.krum_selected``
  lowest-scored gradients (Multi-Krum). The paper's squared distances (torchjd uses plain ones).
  Krum needs k >= f + 3 tasks; a step with fewer (probabilistic schedules) takes their mean.
- TrimmedMean (Yin et al. 2018), coordinate-wise: per coordinate, the mean of the task values
  without the b largest and b smallest (b = ``method.trim``, at most (k - 1) // 2 in a step of k
  tasks).
- GradDrop (Chen et al. 2020, Alg. 1), coordinate-wise and random: per coordinate the positive
  sign purity P = (1 + sum_i g_i / sum_i |g_i|) / 2 and a uniform draw U; the positive task
  values are kept where P > U, the negative ones where P < U, and summed.

The coordinate-wise ones are not functions of the Gram: they act on the rows where they lie
(full rows, a sharded reducer's columns, ZeRO-3's partitions, FSDP2's shards) and need no
communication. GradDrop's U is drawn per *global coordinate* (the parameter's place in the
model, not in this rank's shard) from a counter-based hash of (seed, step, coordinate), so a
coordinate's draw is the same whichever rank holds it and however many ranks there are.
"""

from __future__ import annotations

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs, per_block


def krum_weights(gram: torch.Tensor, byzantine: int, selected: int) -> torch.Tensor:
    M = gram.double()
    k = M.shape[0]
    if k < byzantine + 3:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    d2 = (M.diagonal()[:, None] + M.diagonal()[None, :] - 2 * M).clamp(min=0)
    d2.fill_diagonal_(float("inf"))  # not its own neighbour
    nearest = torch.sort(d2, dim=1).values[:, :k - byzantine - 2]
    scores = nearest.sum(1)
    chosen = torch.sort(scores, stable=True).indices[:min(selected, k)]  # ties: the run's task order
    w = torch.zeros(k, dtype=torch.float64)
    w[chosen] = 1.0 / len(chosen)
    return w


def _krum(gram, inputs: GramInputs):
    return krum_weights(gram, inputs.cfg.krum_byzantine, inputs.cfg.krum_selected)


def trimmed_mean_columns(rows: torch.Tensor, coords: torch.Tensor | None, inputs: GramInputs, state=None) -> torch.Tensor:
    """rows [k, n] -> [n]."""
    k = rows.shape[0]
    b = min(inputs.cfg.trim, (k - 1) // 2)
    if b == 0:
        return rows.mean(0)
    return torch.sort(rows, dim=0).values[b:k - b].mean(0)


_MASKS = [(1 << s) - 1 for s in (34, 37, 33)]


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping multiplies; logical shifts by masking)."""
    x = (x ^ ((x >> 30) & _MASKS[0])) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ ((x >> 27) & _MASKS[1])) * _signed(0x94D049BB133111EB)
    return x ^ ((x >> 31) & _MASKS[2])


def coordinate_uniform(coords: torch.Tensor, key: int) -> torch.Tensor:
    """[n] global coordinates (int64) -> [n] float64 uniform in [0, 1), a function of (key, coordinate)."""
    x = _mix(coords * _signed(0x9E3779B97F4A7C15) + _signed(key))
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)


def graddrop_columns(rows: torch.Tensor, coords: torch.Tensor | None, inputs: GramInputs, state=None) -> torch.Tensor:
    """rows [k, n], coords [n] (-1: padding) -> [n]."""
    key = int(torch.randint(0, 1 << 62, (1,), generator=inputs.generator))  # (seed, step): every rank alike
    u = coordinate_uniform(coords.to(rows.device), key).to(rows.dtype)
    purity = 0.5 * (1 + rows.sum(0) / rows.abs().sum(0))  # NaN where every value is 0: nothing kept
    keep = ((purity > u) & (rows > 0)) | ((purity < u) & (rows < 0))
    return (rows * keep).sum(0)


SPECS = {
    "krum": AggregatorSpec(per_block(_krum), "Blanchard et al. 2017 (Multi-Krum: the mean of the method.krum_selected "
                                             "gradients closest to their k - f - 2 neighbours, f = method.krum_byzantine; "
                                             "torchjd's code read)"),
    "trimmed_mean": AggregatorSpec(None, "Yin et al. 2018 (coordinate-wise trimmed mean, method.trim; torchjd's code "
                                         "read)", columns=trimmed_mean_columns, blocks=False),
    "graddrop": AggregatorSpec(None, "Chen et al. 2020 (GradDrop: gradient sign dropout per coordinate, a draw per "
                                     "global coordinate; torchjd's code read)", columns=graddrop_columns, blocks=False),
}
