"""Per-task gradients of the shared parameters in one flat [K, P] buffer, and the reducers
that make them global across processes.

Shared parameters' ``.grad`` are *views* into row k of the buffer while task k runs its
backward, so autograd accumulates straight into the buffer: no copies, no per-parameter
Python work in the hot path beyond re-pointing ``.grad``. Task-specific parameters (heads,
per-task layers) get their own flat buffer per task and only their task's gradient.
After the aggregator has chosen weights w, the update ``w @ G`` is written into a third flat
buffer that the shared parameters' ``.grad`` then view, and the optimizer steps as usual.

Reducers (design: every method = weights from the Gram matrix; the reducer is swappable):
- ``LocalReducer``: one process.
- ``AllReduceReducer``: all-reduce (average) of the [K, P] rows in flat buckets, then the
  Gram matrix and the update on every rank. Moves 2 K P (N-1)/N floats per rank.
- ``ShardedReducer``: reduce-scatter so each rank holds the averaged [K, P/N] columns, a
  float64 partial Gram matrix all-reduced (K x K), weights identical on every rank, the
  update formed on the shard and all-gathered. Moves (K + 1) P (N-1)/N floats per rank.
- ``GramOnlyReducer``: engines with sharded parameters (ZeRO-3, FSDP2) reduce-scatter each
  task's gradient themselves; only the partial Gram is summed and nothing is gathered.
Byte counts are per rank per step under the ring model (what NCCL/gloo ring algorithms send).

Block Gram (``method.gram_blocks=layer``): the shared columns are cut into parameter blocks
(the embeddings, each encoder layer, the rest) and the reducers return one Gram per block,
``[L, K, K]`` (their sum is the full Gram), all-reduced in one collective under the sharded
reducer; the aggregator may then give each block its own weights (per-layer PCGrad, GradVac).
"""

from __future__ import annotations

import torch

from mtbert.distributed.collectives import Collectives
from mtbert.optim.pcgrad import gram_matrix

Blocks = list[tuple[int, int]]  # [start, end) column ranges of the shared gradient, in order


def block_key(name: str) -> str:
    """The block a parameter belongs to: up to its layer index (``encoder.layers.3``), else its
    first two name parts (``encoder.emb``), else its module (``body``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2] if len(parts) > 2 else parts[:1])


def block_ranges(names: list[str], sizes: list[int], P_pad: int, mode: str) -> Blocks:
    """``whole``: one block; ``layer``: consecutive parameters with the same ``block_key``."""
    if mode == "whole" or not names:
        return [(0, P_pad)]
    out, start, offset = [], 0, 0
    for i, (name, n) in enumerate(zip(names, sizes)):
        offset += n
        if i + 1 == len(names) or block_key(names[i + 1]) != block_key(name):
            out.append((start, offset))
            start = offset
    out[-1] = (out[-1][0], P_pad)  # the padding columns (zeros) join the last block
    return out


def block_gram(rows: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """[k, n] columns and their block ranges (local to these columns) -> [L, k, k] float64."""
    k = rows.shape[0]
    out = torch.zeros(len(blocks), k, k, dtype=torch.float64, device=rows.device)
    for b, (s, e) in enumerate(blocks):
        if e > s:
            out[b] = gram_matrix(rows[:, s:e])
    return out


def local_blocks(blocks: Blocks, start: int, n: int) -> Blocks:
    """The block ranges inside columns [start, start + n), relative to start (may be empty)."""
    return [(min(max(s - start, 0), n), min(max(e - start, 0), n)) for s, e in blocks]


def combine_into(update: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, blocks: Blocks | None) -> None:
    """update[:n] <- w @ rows for rows [k, n]; w [k], or [L, k] with one weight vector per block
    of ``blocks`` (ranges local to ``rows``)."""
    if w.dim() == 1 or w.shape[0] == 1:
        torch.mv(rows.T, w.reshape(-1).to(rows.dtype), out=update[:rows.shape[1]])
        return
    for wb, (s, e) in zip(w, blocks):
        if e > s:
            torch.mv(rows[:, s:e].T, wb.to(rows.dtype), out=update[s:e])


def _views(flat: torch.Tensor, params: list) -> list[torch.Tensor]:
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return out


def split_parameters(model: torch.nn.Module, tasks: list[str]) -> tuple[list[str], list, dict[str, list]]:
    """Trainable parameters -> (shared names, shared parameters, task -> its own parameters), in
    the module's order (so parameter blocks are column ranges of the shared rows)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    own = {t: set(model.task_parameter_names(t)) for t in tasks}
    all_own = set().union(*own.values())
    shared = [(n, p) for n, p in named if n not in all_own]
    return [n for n, _ in shared], [p for _, p in shared], {t: [p for n, p in named if n in own[t]] for t in tasks}


class TaskRows:
    """What every per-task gradient store has (full rows here; partitions or shards in the
    sharded engines): ``tasks``, rows ``G`` [K, n] and the combined ``update`` [n]."""

    tasks: list[str]
    G: torch.Tensor
    update: torch.Tensor

    def rows(self, present: list[str]) -> torch.Tensor:
        idx = [self.tasks.index(t) for t in present]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return self.G[idx[0]:idx[0] + len(idx)]  # a view: no copy
        return self.G[idx]

    def set_update_values(self, values: torch.Tensor) -> None:
        """update[:n] <- a coordinate-wise method's values for the rows' n columns."""
        self.update[:values.numel()].copy_(values)

    def set_update(self, w: torch.Tensor, rows: torch.Tensor, blocks: Blocks | None = None) -> None:
        """update <- w @ rows. rows: [k, n], or [k, P_pad/N] columns of this rank under the
        sharded reducer (its ``finish`` then all-gathers the rest of ``self.update``).
        w: [k], or [L, k] per block with ``blocks`` the block ranges local to ``rows``."""
        combine_into(self.update, w, rows, blocks)


class GradientBuffers(TaskRows):
    """Flat per-task gradient storage for one model and a fixed task list."""

    def __init__(self, model: torch.nn.Module, tasks: list[str], world: int = 1, gram_blocks: str = "whole"):
        shared_names, self.shared, self.private = split_parameters(model, tasks)
        self.tasks = list(tasks)
        ref = next(p for p in model.parameters() if p.requires_grad)
        # Rows, Gram input and update stay fp32 whatever the parameter dtype (DeepSpeed bf16
        # casts the parameters): a bf16 row would round every per-task gradient and the Gram.
        dtype = torch.float32 if ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype
        self.dtype, self.attachable = dtype, dtype == ref.dtype  # .grad views need the param's dtype
        self.P = sum(p.numel() for p in self.shared)
        P_pad = -(-self.P // world) * world  # divisible by the world size for reduce-scatter
        self.G = torch.zeros(len(tasks), P_pad, dtype=dtype, device=ref.device)  # [K, P_pad]
        self.update = torch.zeros(P_pad, dtype=dtype, device=ref.device)  # [P_pad]
        self.blocks = block_ranges(shared_names, [p.numel() for p in self.shared], P_pad, gram_blocks)
        self.row_views = [_views(self.G[k], self.shared) for k in range(len(tasks))]
        self.update_views = _views(self.update, self.shared)
        self.priv_flat = {t: torch.zeros(sum(p.numel() for p in ps), dtype=dtype, device=ref.device)
                          for t, ps in self.private.items()}
        self.priv_views = {t: _views(self.priv_flat[t], ps) for t, ps in self.private.items()}

    def start(self, present: list[str], attach: bool = True) -> None:
        """Zero the rows and private buffers of the tasks in this step; others' grads are None.
        attach=False (DeepSpeed): fill the buffers through ``accumulate``, never via ``.grad``."""
        for t in self.tasks:
            if t in present:
                self.G[self.tasks.index(t)].zero_()
                self.priv_flat[t].zero_()
                for p, v in zip(self.private[t], self.priv_views[t]):
                    p.grad = v if attach else None
            else:
                for p in self.private[t]:
                    p.grad = None  # an absent task's head must not move (AdamW would decay it)

    def point_to(self, task: str) -> None:
        """Make backward accumulate the shared gradients into ``task``'s row."""
        for p, v in zip(self.shared, self.row_views[self.tasks.index(task)]):
            p.grad = v

    def accumulate(self, task: str, grads) -> None:
        """Add autograd.grad results for (shared + task's private) parameters into the buffers
        (used where hooks forbid accumulating into .grad, i.e. under DeepSpeed)."""
        k = self.tasks.index(task)
        views = self.row_views[k] + self.priv_views[task]
        pairs = [(v, g) for v, g in zip(views, grads) if g is not None]
        if pairs and self.attachable:
            torch._foreach_add_([v for v, _ in pairs], [g for _, g in pairs])
        else:  # bf16 gradients into fp32 rows (a foreach add wants one dtype)
            for v, g in pairs:
                v.add_(g)

    def absent(self, present: list[str]) -> list[str]:
        return [t for t in self.tasks if t not in present]


    def coordinates(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        """[P_pad] each column's global coordinate (its place in the shared parameters, in the
        module's order); -1 for the padding."""
        coords = torch.arange(self.G.shape[1], device=self.G.device)
        return torch.where(coords < self.P, coords, -1)

    def attach_update(self) -> None:
        """shared .grad <- views of the update, for the optimizer."""
        for p, v in zip(self.shared, self.update_views):
            p.grad = v


class LocalReducer:
    """One process: nothing to reduce. Every reducer: ``launch`` a finished task row (its
    reduction may start at once, while the next task computes), ``wait`` for all of them, then
    ``reduce`` -> Gram; ``finish`` completes the update after the weights."""

    world = 1

    def launch(self, k: int, row: torch.Tensor, private: torch.Tensor) -> None:
        pass

    def wait(self) -> None:
        pass

    def reduce(self, rows: torch.Tensor, private: list[torch.Tensor], blocks: Blocks, idx: list[int] | None = None):
        """-> (block Grams [L, k, k] float64, rows to combine, their block ranges, bytes moved)."""
        return block_gram(rows, blocks), rows, blocks, 0

    def finish(self, update: torch.Tensor) -> int:
        return 0

    def local_columns(self, coords: torch.Tensor) -> torch.Tensor:
        """The global coordinates of the columns ``reduce`` returned (all of them here)."""
        return coords

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over the columns ``reduce`` returned -> over every coordinate (here: whole rows)."""
        return t


def _ring_bytes(t: torch.Tensor, world: int, passes: int = 2) -> int:
    """Bytes one rank sends for t under the ring model (all-reduce: 2 passes, RS/AG: 1)."""
    return passes * t.numel() * t.element_size() * (world - 1) // world


class AllReduceReducer(LocalReducer):
    """Average every task's full gradient on every rank (in buckets, each task's row as soon as
    its backward is done), then Gram + update locally."""

    def __init__(self, coll: Collectives):
        self.coll, self.world, self.pending = coll, coll.world, []

    def launch(self, k, row, private):
        self.pending += [self.coll.all_reduce_mean(row), self.coll.all_reduce_mean(private)]

    def wait(self):
        for p in self.pending:
            p.wait()
        self.pending = []

    def reduce(self, rows, private, blocks, idx=None):
        """``rows`` [k, P_pad] were launched and waited for (a view of G or a copy made after)."""
        moved = _ring_bytes(rows, self.world) + sum(_ring_bytes(flat, self.world) for flat in private)
        return block_gram(rows, blocks), rows, blocks, moved


class ShardedReducer(AllReduceReducer):
    """Reduce-scatter per-task gradients (each as soon as its backward is done); only the K x K
    Gram matrix is all-reduced, and the update formed on the shard is all-gathered."""

    def __init__(self, coll: Collectives, K: int):
        super().__init__(coll)
        self.K, self.shard = K, None  # shard: [K, P_pad / N], this rank's columns of every task's row

    def launch(self, k, row, private):
        if self.shard is None:
            self.shard = torch.empty(self.K, row.numel() // self.world, dtype=row.dtype, device=row.device)
        self.pending += [self.coll.reduce_scatter_mean(self.shard[k], row), self.coll.all_reduce_mean(private)]

    def reduce(self, rows, private, blocks, idx=None):
        k, P_pad = rows.shape
        n = P_pad // self.world
        idx = list(range(k)) if idx is None else idx
        contiguous = idx == list(range(idx[0], idx[0] + k))
        shard = self.shard[idx[0]:idx[0] + k] if contiguous else self.shard[idx]  # [k, P/N]
        mine = local_blocks(blocks, self.coll.rank * n, n)  # each parameter block's part in this shard
        gram = block_gram(shard, mine)  # [L, k, k] partial
        self.coll.all_reduce_sum_(gram)  # sums of partial Grams over column blocks = the full block Grams
        moved = _ring_bytes(rows, self.world, 1) + 2 * gram.numel() * 8
        moved += sum(_ring_bytes(flat, self.world) for flat in private)
        return gram, shard, mine, moved

    def local_columns(self, coords: torch.Tensor) -> torch.Tensor:
        n = coords.numel() // self.world
        return coords[self.coll.rank * n:(self.coll.rank + 1) * n]

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(self.coll, t)

    def finish(self, update: torch.Tensor) -> int:
        """The update was formed on this rank's columns (first P/N of ``update``): gather all."""
        n = update.numel() // self.world
        local = update[:n].clone()
        self.coll.all_gather_into(update, local)
        return _ring_bytes(update, self.world, 1)


class GramOnlyReducer(LocalReducer):
    """For engines that shard gradients themselves (ZeRO-3, FSDP2): after each task's backward
    every rank already holds its shard of that task's averaged gradient, so only the partial
    K x K Gram matrices (one per block) are summed over ranks; each rank keeps its shard of the
    update, which the engine steps where it lies."""

    def __init__(self, coll: Collectives, shard_bytes: int):
        self.coll, self.world = coll, coll.world
        self.rs_bytes = shard_bytes * (coll.world - 1)  # what the engine's reduce-scatter of one task sends

    def reduce(self, rows, private, blocks, idx=None):
        gram = block_gram(rows, blocks)  # [L, k, k] partial, float64
        self.coll.all_reduce_sum_(gram)
        return gram, rows, blocks, rows.shape[0] * self.rs_bytes + _ring_bytes(gram, self.world)

    def finish(self, update: torch.Tensor) -> int:
        return 0

    def sum_partials(self, t: torch.Tensor) -> torch.Tensor:
        return _sum_over_ranks(self.coll, t)


def _sum_over_ranks(coll, t: torch.Tensor) -> torch.Tensor:
    """Each rank's partial sums (its columns) -> the sums over every column, on every rank."""
    out = t.to(coll.device).clone()
    coll.all_reduce_sum_(out)
    return out.to(t.device)


def make_reducer(kind: str, coll: Collectives, K: int):
    """K: the run's number of tasks (rows)."""
    if coll.world == 1:
        return LocalReducer()
    return ShardedReducer(coll, K) if kind == "sharded" else AllReduceReducer(coll)
