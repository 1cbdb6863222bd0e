"""Several trainer configurations in turn in one launch: one process group, a fresh run per case.

    accelerate launch --config_file accelerate_configs/<engine>.yaml [--num_processes N] \\
        tests/helpers/run_cases.py PLAN.json

PLAN.json: ``{"results": DIR, "cases": [{"id": str, "args": [trainer overrides...]}, ...]}``; a case
may inject a fault: ``"nan_calls"`` makes the task loss NaN on those loss calls of the case
(1-based, per process: "7,8,9", or "13-" for every call from the 13th on), on the ranks in
``"nan_ranks"`` ("0,1"; empty: all); ``"stop_at_step"``: N sends every rank SIGUSR1 (a preemption
warning) right after step N, so the run checkpoints and exits 75 as under Slurm.
Why: a launched run costs ~10 s of start-up (interpreters, imports, the launcher, DeepSpeed's
set-up) and ~0.3 s of training on the tiny test model; the equivalence matrix runs ~100 cases.

Each case is ``mtbert.train.train`` as users run it, in this process: Accelerate's state is reset,
so the case builds its own Accelerator (the launch's process group is kept), model, optimizer,
sampler, RNG state (``set_seed``) and engine; afterwards ``train.release`` destroys a DeepSpeed
engine and frees the Accelerator's references. Several DeepSpeed engines of one stage in one
process group train exactly (shared/notes/engine-facts.md, "Several DeepSpeed engines").

Per case, every rank writes its console output to ``DIR/<id>.rank<r>.log``; rank 0 then writes
``DIR/<id>.json`` (exit code, wall time). A case that raises writes its traceback to
``DIR/<id>.rank<r>.error`` and ends the launch with exit 1 (the other ranks would wait in a
collective; the launcher stops them): tests/harness.py relaunches the cases after it. The
launch ends through ``mtbert.process.leave``, like every launched process of mtbert.
"""

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from mtbert import process

process.guard_process()  # before the heavy imports, as the trainer does

from mtbert import train  # noqa: E402
from mtbert.collectives import destroy_process_group  # noqa: E402


def reset_accelerate() -> None:
    """Accelerate keeps its state in process-wide singletons; the process group survives this."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


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

    from mtbert.step import Stepper
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


def run_case(case: dict, results: Path, rank: int) -> None:
    log = results / f"{case['id']}.rank{rank}.log"
    start = time.time()
    fault = contextlib.ExitStack()
    if case.get("nan_calls"):
        fault.enter_context(nan_losses(case["nan_calls"], case.get("nan_ranks", ""), rank))
    if case.get("stop_at_step"):
        fault.enter_context(stop_signal_after(case["stop_at_step"]))
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), fault:
        reset_accelerate()
        code, run = train.train(case["args"])
        if run is not None:
            train.release(run)
    if rank == 0:
        tmp = results / f"{case['id']}.json.tmp"
        tmp.write_text(json.dumps({"code": code, "wall_s": round(time.time() - start, 3)}))
        os.replace(tmp, results / f"{case['id']}.json")


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    results, rank = Path(plan["results"]), int(os.environ.get("RANK", "0"))
    results.mkdir(parents=True, exist_ok=True)
    for case in plan["cases"]:
        try:
            run_case(case, results, rank)
        except BaseException:  # noqa: BLE001 - any failure: say where, then stop the launch
            (results / f"{case['id']}.rank{rank}.error").write_text(traceback.format_exc())
            print(f"case {case['id']} failed on rank {rank}: see {results}", file=sys.stderr, flush=True)
            process.leave(1)
    destroy_process_group()
    return 0


if __name__ == "__main__":
    process.leave(main(sys.argv[1]))
