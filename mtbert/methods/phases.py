"""The run as a list of phases: which tasks train, for how many steps, with what loss scale.

- joint training: one phase per epoch with every task;
- sequential (seeds' baseline that shows forgetting): one task after another, `epochs` each,
  every task evaluated after each stage;
- pairwise joint training (seed "MiniBERT: Training Jointly"): each epoch trains the pairs
  (t1, t2), (t2, t3), (t3, t1) in turn, a third of the epoch each;
- ARRP (seed "Post-Op BERT"): after each round-robin epoch, `arrp_batches` extra batches of
  the largest task, loss scaled by lambda, optionally with everything but its head frozen.
The phase list is a pure function of the config and the data sizes, so a resumed run finds
its place from the global step alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    tasks: tuple[str, ...]
    steps: int
    epoch: int  # 1-based epoch (annealed sampling reads it)
    label: str
    loss_scale: float = 1.0
    head_only: bool = False  # ARRP freeze: only the task's head trains
    eval_after: bool = True


def epoch_steps(setting: str, batches: dict[str, int]) -> int:
    """`smallest` / `largest` / `sum` of the tasks' batches per epoch, a multiple such as
    `2*largest` or `0.5*smallest`, or a plain number of steps."""
    factor, _, base = setting.rpartition("*")
    if base in ("smallest", "largest", "sum"):
        n = {"smallest": min, "largest": max, "sum": sum}[base](batches.values())
        return max(1, round(float(factor or 1) * n))
    return int(setting)


def build_phases(cfg, batches: dict[str, int]) -> list[Phase]:
    """batches: task -> global batches per epoch of its training set."""
    t, m = cfg.train, cfg.method
    tasks = tuple(t.train_tasks or cfg.data.tasks)
    phases = []
    if t.schedule == "sequential":
        for task in tasks:
            n = epoch_steps(t.epoch_steps, {task: batches[task]})
            for e in range(1, t.epochs + 1):
                phases.append(Phase((task,), n, e, f"{task} epoch {e}", eval_after=e == t.epochs))
        return phases
    n = epoch_steps(t.epoch_steps, batches)
    largest = max(tasks, key=lambda k: batches[k])
    for e in range(1, t.epochs + 1):
        if m.pairwise:
            pairs = [(tasks[i], tasks[(i + 1) % len(tasks)]) for i in range(len(tasks))] if len(tasks) > 2 else [tasks]
            for i, pair in enumerate(pairs):
                phases.append(Phase(pair, max(1, n // len(pairs)), e, f"epoch {e} pair {'+'.join(pair)}",
                                    eval_after=i == len(pairs) - 1))
        else:
            phases.append(Phase(tasks, n, e, f"epoch {e}"))
        if m.arrp_batches:
            phases.append(Phase((largest,), m.arrp_batches, e, f"epoch {e} ARRP {largest}",
                                loss_scale=m.arrp_weight, head_only=m.arrp_freeze == "all_but_head"))
    return phases
