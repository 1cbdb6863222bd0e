"""mtbert.training.multirun with the faults tests inject (tests/harness.py launches it):

    accelerate launch --config_file accelerate_configs/<engine>.yaml [--num_processes N] \
        tests/helpers/run_cases.py PLAN.json

PLAN.json as mtbert.training.multirun's; a case may also inject a fault: ``"nan_calls"`` makes the task
loss NaN on those loss calls of the case (1-based, per process: "7,8,9", or "13-" for every call
from the 13th on), on the ranks in ``"nan_ranks"`` ("0,1"; empty: all); ``"stop_at_step"``: N
sends every rank SIGUSR1 (a preemption warning) right after step N, so the run checkpoints and
exits 75 as under Slurm. The launch ends through ``mtbert.training.process.leave``.
"""

import contextlib
import os
import sys

from mtbert.training import process

process.guard_process()  # before the heavy imports, as the trainer does

from mtbert.training.multirun import run_plan  # noqa: E402


@contextlib.contextmanager
def nan_losses(calls: str, ranks: str, rank: int):
    """The task loss is NaN on the listed loss calls of this case (a fault injected by the test)."""
    from mtbert.model.heads import TaskHead
    real, count = TaskHead.loss, {"n": 0}

    def hit(n: int) -> bool:
        if ranks and str(rank) not in ranks.split(","):
            return False
        return n >= int(calls[:-1]) if calls.endswith("-") else n in {int(x) for x in calls.split(",")}

    def loss(self, out, y):
        count["n"] += 1
        value = real(self, out, y)
        return value * float("nan") if hit(count["n"]) else value
    TaskHead.loss = loss
    try:
        yield
    finally:
        TaskHead.loss = real


@contextlib.contextmanager
def stop_signal_after(step: int):
    """SIGUSR1 to this rank right after optimizer step ``step`` (every rank does the same)."""
    import signal

    from mtbert.training.step import Stepper
    real = Stepper.step

    def stepped(self, at, *a, **k):
        out = real(self, at, *a, **k)
        if at + 1 == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out
    Stepper.step = stepped
    try:
        yield
    finally:
        Stepper.step = real


def faults(case: dict, rank: int):
    """The faults a case asks for, as one context manager around its run."""
    stack = contextlib.ExitStack()
    if case.get("nan_calls"):
        stack.enter_context(nan_losses(case["nan_calls"], case.get("nan_ranks", ""), rank))
    if case.get("stop_at_step"):
        stack.enter_context(stop_signal_after(case["stop_at_step"]))
    return stack


if __name__ == "__main__":
    process.leave(run_plan(sys.argv[1], around=faults))
