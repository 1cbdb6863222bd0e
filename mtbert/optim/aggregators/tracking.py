"""Methods that keep per-task state *per coordinate* beside the rows (``column_state``: [K, n]
tensors on this rank's columns, the same layout as the rows -- full under DDP's all-reduce, a
shard under the sharded reducer, ZeRO-3's partitions, FSDP2's shards -- written by every rank
into its checkpoint, ``method_columns.rank<r>.safetensors``). Their few global numbers (sums
over all coordinates) are partial sums summed over ranks (``sum_partials``), and their small
state (weights, step counts) is the usual method state, identical on every rank.

- ExcessMTL (He et al. 2024; torchjd's and LibMTL's code read): the excess risk of task i is
  estimated as e_i = sum_j g_ij^2 / H_ij with H = sqrt(S + 1e-7), S the running sum of squared
  gradients (AdaGrad's diagonal); relative to the first step's e (LibMTL: the first step only
  records it; torchjd would use the raw e there, which overflows exp for a BERT-sized gradient),
  the weights move by a <- a exp(eta e / e0), normalised (eta = ``method.excess_eta``).
- MoCo (Fernando et al. 2023; LibMTL's code and torchjd's PR read): a tracked gradient estimate
  Y <- Y - beta_t (Y - G) per task, beta_t = 0.5 / sqrt(t), and weights
  lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda), gamma_t = ``method.moco_gamma`` /
  sqrt(t) (LibMTL's and torchjd's softmax; the paper projects onto the simplex); the update is
  lambda^T Y, the tracked estimates, not this step's gradients.
- DB-MTL (Lin et al. 2023; LibMTL's code read): each task's gradient of its log loss,
  g_i / L_i (L the global batch's loss), averaged into a buffer B_i <- beta B_i + (1 - beta)
  g_i / L_i (beta = ``method.dbmtl_beta``), then scaled to the largest buffer's norm:
  update = sum_i (max_j ||B_j|| / ||B_i||) B_i. (LibMTL also scales the task heads' gradients
  by 1 / L_i; mtbert's heads keep their own task gradients, as for every per-task method.)
"""

from __future__ import annotations

import torch

from mtbert.optim.aggregators.base import AggregatorSpec, GramInputs


def _cols(K: int, n: int, like: torch.Tensor, *names: str) -> dict:
    return {name: torch.zeros(K, n, dtype=like.dtype, device=like.device) for name in names}  # the rows: fp32


def excess_mtl_columns(rows: torch.Tensor, coords, inputs: GramInputs, state: dict) -> torch.Tensor:
    idx = inputs.tasks.to(rows.device)
    S = inputs.column_state["S"]
    S[idx] += rows * rows
    H = (S[idx] + 1e-7).sqrt()
    e = inputs.sum_partials((rows * rows / H).double().sum(1)).cpu()  # [k] sums over every coordinate
    t = inputs.tasks
    first = state["e0"][t] <= 0
    state["e0"][t] = torch.where(first, e, state["e0"][t])
    a = state["a"][t] / state["a"][t].sum()
    grow = torch.where(first, torch.zeros_like(e), inputs.cfg.excess_eta * e / (state["e0"][t] + 1e-7))
    a = a * torch.exp(grow - grow.max())  # (the max out: no overflow; the normalisation removes it)
    a = a / a.sum()
    state["a"][t] = a
    return a.to(rows.dtype) @ rows


def moco_columns(rows: torch.Tensor, coords, inputs: GramInputs, state: dict) -> torch.Tensor:
    idx, t = inputs.tasks.to(rows.device), inputs.tasks
    state["t"][t] += 1
    step = state["t"][t]  # [k] per task (a schedule may leave a task out of a step)
    beta = (0.5 / step.sqrt()).to(rows.dtype).to(rows.device)
    Y = inputs.column_state["Y"]
    Y[idx] = Y[idx] - beta[:, None] * (Y[idx] - rows)
    YY = inputs.sum_partials(Y[idx].double() @ Y[idx].double().T).cpu()  # [k, k]
    lam = state["lam"][t] / state["lam"][t].sum()
    gamma = inputs.cfg.moco_gamma / step.sqrt()
    lam = torch.softmax(lam - gamma * (YY @ lam + inputs.cfg.moco_rho * lam), 0)
    state["lam"][t] = lam
    return lam.to(rows.dtype) @ Y[idx]


def dbmtl_columns(rows: torch.Tensor, coords, inputs: GramInputs, state: dict) -> torch.Tensor:
    idx = inputs.tasks.to(rows.device)
    losses = inputs.global_losses().to(rows.device)  # [k]
    beta = inputs.cfg.dbmtl_beta
    B = inputs.column_state["B"]
    B[idx] = beta * B[idx] + (1 - beta) * rows / (losses[:, None].to(rows.dtype) + 1e-8)
    norms = inputs.sum_partials((B[idx].double() ** 2).sum(1)).sqrt().cpu()  # [k]
    alpha = norms.max() / (norms + 1e-8)
    return alpha.to(rows.dtype).to(rows.device) @ B[idx]


SPECS = {
    "excess_mtl": AggregatorSpec(None, "He et al. 2024 (ExcessMTL: weights grow with each task's excess risk, "
                                       "estimated with AdaGrad's diagonal, method.excess_eta; torchjd's and "
                                       "LibMTL's code read)", columns=excess_mtl_columns, blocks=False,
                                 init_state=lambda K, L: {"a": torch.ones(K, dtype=torch.float64),
                                                          "e0": torch.zeros(K, dtype=torch.float64)},
                                 column_state=lambda K, n, like: _cols(K, n, like, "S")),
    "moco": AggregatorSpec(None, "Fernando et al. 2023 (MoCo: tracked gradient estimates and their weights, "
                                 "method.moco_gamma, method.moco_rho; LibMTL's code and torchjd's PR read)",
                           columns=moco_columns, blocks=False,
                           init_state=lambda K, L: {"lam": torch.ones(K, dtype=torch.float64),
                                                    "t": torch.zeros(K, dtype=torch.float64)},
                           column_state=lambda K, n, like: _cols(K, n, like, "Y")),
    "db_mtl": AggregatorSpec(None, "Lin et al. 2023 (DB-MTL: log-loss gradients averaged, scaled to the largest "
                                   "norm, method.dbmtl_beta; LibMTL's code read)", columns=dbmtl_columns,
                             blocks=False, column_state=lambda K, n, like: _cols(K, n, like, "B")),
}
