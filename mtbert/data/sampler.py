"""Task schedules and the sharded task sampler.

Every rank computes the same schedule (which tasks, how many examples of the *global* batch)
from (seed, step) alone, so all ranks train the same tasks at every step and per-task
gradients can be reduced together; the plan does not depend on the world size. Each task is
an endless stream of epochs; epoch e's order is a permutation drawn from (seed, task, e). A
step takes the planned number of consecutive examples of that order (a "global batch") and
each rank keeps its slice (``rank_slices``): shards are disjoint, and one process with batch
n x world sees exactly the union of the ranks' batches.

Even-length policy: an epoch's tail shorter than one global batch is dropped (every epoch is
reshuffled, so a dropped example is seen in other epochs). With bucketing, the order is
arranged so that each global batch holds examples of similar length (chunks of 50 global
batches sorted by length, then the batches shuffled), which keeps padding low.

State = per task (epoch, position) + nothing else: the schedule is a function of the step.
"""

from __future__ import annotations

import random

import torch

from mtbert.errors import ConfigError

SCHEDULES = ("round_robin", "proportional", "annealed", "temperature", "union", "sequential")


def annealed_alpha(epoch: int, epochs: int) -> float:
    """Stickland & Murray (2019): alpha = 1 - 0.8 (e - 1) / (E - 1), e = 1..E; alpha = 1 when E = 1."""
    return 1.0 if epochs <= 1 else 1.0 - 0.8 * (epoch - 1) / (epochs - 1)


def task_probs(kind: str, sizes: dict[str, int], epoch: int = 1, epochs: int = 1, temperature: float = 2.0):
    """Sampling probability per task for the probabilistic schedules."""
    power = {"proportional": 1.0, "union": 1.0, "annealed": annealed_alpha(epoch, epochs),
             "temperature": 1.0 / temperature}[kind]
    w = {k: n ** power for k, n in sizes.items()}
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def plan_step(kind: str, seed: int, step: int, active: dict[str, int], batch: int,
              epoch: int = 1, epochs: int = 1, temperature: float = 2.0) -> dict[str, int]:
    """Examples per task in the *global* batch at ``step``; identical on every rank.

    active: task -> training-set size, for the tasks this phase trains; batch: the global
    batch (per-rank batch x world), so the plan does not depend on the world size.
    round_robin/sequential: a batch of every active task. proportional/annealed/temperature:
    one task drawn by its probability. union: one batch drawn from the union of all active
    tasks' examples, i.e. multinomial counts per task (tasks with 0 are left out).
    """
    if kind in ("round_robin", "sequential") or len(active) == 1:
        return {k: batch for k in active}
    rng = random.Random(f"{seed}:{step}")  # str seeds hash with sha512: stable across runs
    probs = task_probs(kind, active, epoch, epochs, temperature)
    names = list(probs)
    if kind == "union":
        counts = dict.fromkeys(names, 0)
        for name in rng.choices(names, weights=[probs[n] for n in names], k=batch):
            counts[name] += 1
        return {k: v for k, v in counts.items() if v}
    return {rng.choices(names, weights=[probs[n] for n in names])[0]: batch}


def rank_slices(plan: dict[str, int], world: int, rank: int, union: bool) -> dict[str, tuple[int, int]]:
    """This rank's part [lo, hi) of each task's global examples in ``plan``.

    Per-task schedules: every task's global count is world x b; rank r takes the r-th b.
    union: the global batch is laid out task after task (in plan order) and rank r takes
    positions [r B, (r+1) B) of it (B = global / world), so a rank may hold a task's examples
    partly or not at all; the step weighs each rank's loss by its share (step.MicroBatch)."""
    if not union:
        return {t: (rank * n // world, (rank + 1) * n // world) for t, n in plan.items()}
    per_rank = sum(plan.values()) // world
    lo_r, hi_r = rank * per_rank, (rank + 1) * per_rank
    out, offset = {}, 0
    for t, n in plan.items():
        lo, hi = max(offset, lo_r), min(offset + n, hi_r)
        out[t] = (lo - offset, hi - offset) if lo < hi else (0, 0)
        offset += n
    return out


class TaskStream:
    """One task's training examples as an endless, sharded, resumable stream of indices."""

    def __init__(self, task_index: int, lengths: list[int], seed: int, world: int, rank: int,
                 batch: int, bucket: bool):
        self.task_index, self.lengths, self.seed = task_index, lengths, seed
        self.world, self.rank, self.batch, self.bucket = world, rank, batch, bucket
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, None

    def __len__(self):
        return len(self.lengths)

    def batches_per_epoch(self) -> int:
        return len(self.lengths) // (self.batch * self.world)

    def order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.task_index * 10_007 + epoch)
            perm = torch.randperm(len(self.lengths), generator=g).tolist()
            if self.bucket:
                gb = self.batch * self.world
                chunk = gb * 50
                perm = [i for s in range(0, len(perm), chunk)
                        for i in sorted(perm[s:s + chunk], key=self.lengths.__getitem__)]
                full = len(perm) // gb * gb
                groups = [perm[s:s + gb] for s in range(0, full, gb)]
                shuffle = torch.randperm(len(groups), generator=g).tolist()
                perm = [i for j in shuffle for i in groups[j]] + perm[full:]
            self._order_epoch, self._order = epoch, perm
        return self._order

    def take(self, n: int) -> list[int]:
        """This rank's next ``n`` indices of an evenly split global batch of n x world."""
        return self.take_global(n * self.world, self.rank * n, (self.rank + 1) * n)

    def take_global(self, gb: int, lo: int, hi: int) -> list[int]:
        """Advance by a global batch of ``gb`` examples; return this rank's part [lo, hi) of it."""
        if gb > len(self.lengths):
            raise ConfigError(f"data.batch_size: a global batch of {gb} is larger than task {self.task_index}'s "
                              f"{len(self.lengths)} training examples; lower data.batch_size")
        if self.pos + gb > len(self.lengths):  # drop the tail: every global batch is whole
            self.epoch, self.pos = self.epoch + 1, 0
        window = self.order(self.epoch)[self.pos:self.pos + gb]
        self.pos += gb
        self.last_window_start = window[0]
        return window[lo:hi]


class ShardedTaskSampler:
    """The task streams of a run; ``next(plan)`` gives this rank's indices per planned task."""

    def __init__(self, lengths: dict[str, list[int]], seed: int, world: int, rank: int,
                 batch: int, bucket: bool):
        self.world, self.rank = world, rank
        self.streams = {name: TaskStream(i, ls, seed, world, rank, batch, bucket)
                        for i, (name, ls) in enumerate(lengths.items())}

    def next(self, plan: dict[str, int], union: bool = False) -> dict[str, list[int]]:
        """plan: global examples per task (``plan_step``) -> this rank's indices per task
        (an empty list where this rank holds none of that task's examples)."""
        world, rank = self.world, self.rank
        parts = rank_slices(plan, world, rank, union)
        return {task: self.streams[task].take_global(n, *parts[task]) for task, n in plan.items()}

    def placeholder(self, task: str) -> list[int]:
        """One example of ``task``'s last global batch, for a rank that holds none of it: it
        runs with weight 0 (step.MicroBatch), so ranks produce gradients in lockstep."""
        return [self.streams[task].last_window_start]

    def state_dict(self) -> dict:
        return {name: [s.epoch, s.pos] for name, s in self.streams.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, (epoch, pos) in state.items():
            self.streams[name].epoch, self.streams[name].pos = epoch, pos
