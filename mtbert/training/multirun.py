"""Several trainer runs in turn in one process (one launch, one process group): what a sweep of
short runs costs without paying the start-up of each.

    accelerate launch --config_file accelerate_configs/<engine>.yaml [--num_processes N] \\
        -m mtbert.training.multirun PLAN.json

PLAN.json: ``{"results": DIR, "cases": [{"id": str, "args": [trainer overrides...]}, ...]}``.
A launched run costs ~10 s of start-up on a 2-core machine (interpreters, imports of torch,
transformers, accelerate and DeepSpeed, the launcher, DeepSpeed's set-up) for seconds of work on
a small model; the equivalence tests (tests/harness.py) and the GPU acceptance check
(mtbert/bench/gpu_check.py) run dozens of runs this way.

Each case is ``mtbert.train.train`` as the command line runs it: Accelerate's singletons are
reset, so the case builds its own Accelerator (the launch's process group is kept: Accelerate and
DeepSpeed reuse an initialised group), model, optimizer, sampler, RNG state (``set_seed``) and
engine; afterwards ``train.release`` destroys a DeepSpeed engine. Several DeepSpeed engines of one
stage in one process group train exactly (shared/notes/engine-facts.md; docs/testing.md). The
launch's config decides the engine of a case (Accelerate reads it from the environment), unless
the case brings its own config's environment (``env`` below).

A case may carry ``"env"``: the variables ``accelerate launch`` would set for another config
(``tests/harness.py``, ``launch_env``), applied for that case only (``"env_keys"``: every variable
any case of the plan sets, unset where this case's ``env`` lacks it), so one launch can run
cases of several engines in turn (docs/testing.md says when the tests do).

Per case, every rank writes its console output to ``DIR/<id>.rank<r>.log``; rank 0 then writes
``DIR/<id>.json`` (exit code, wall time). A case that raises writes its traceback to
``DIR/<id>.rank<r>.error`` and ends the launch with exit 1 (the other ranks would wait in a
collective; the launcher stops them). The launch ends through ``mtbert.training.process.leave``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from mtbert.training import process


def reset_accelerate() -> None:
    """Accelerate keeps its state in process-wide singletons; the process group survives this."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@contextlib.contextmanager
def launch_environment(env: dict | None, keys):
    """The case's launch variables (Accelerate reads its engine from them), restored afterwards."""
    if env is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in {*keys, *env}}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_case(case: dict, results: Path, rank: int, around: Callable | None = None) -> None:
    """One run; ``around(case, rank)`` -> a context manager the run happens inside (faults a test
    injects), or None."""
    from mtbert import train
    log = results / f"{case['id']}.rank{rank}.log"
    start = time.time()
    extra = around(case, rank) if around else contextlib.nullcontext()
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), extra, \
            launch_environment(case.get("env"), case.get("env_keys", ())):
        reset_accelerate()
        code, run = train.train(case["args"])
        if run is not None:
            train.release(run)
    if rank == 0:
        tmp = results / f"{case['id']}.json.tmp"
        tmp.write_text(json.dumps({"code": code, "wall_s": round(time.time() - start, 3)}))
        os.replace(tmp, results / f"{case['id']}.json")


def run_plan(plan_file: str, around: Callable | None = None) -> int:
    """Every case of the plan in turn (see the module docstring). -> 0."""
    from mtbert.distributed.collectives import destroy_process_group
    plan = json.loads(Path(plan_file).read_text())
    results, rank = Path(plan["results"]), int(os.environ.get("RANK", "0"))
    results.mkdir(parents=True, exist_ok=True)
    for case in plan["cases"]:
        # Each run ends with Accelerate's free_memory: a full gc.collect(), which walks every object
        # of torch, transformers and DeepSpeed (~0.3 s per run and rank: 27% of a test case's time,
        # py-spy, 2026-12-07). So what is alive between two runs (modules, caches) is frozen out of
        # the collector's reach (gc.freeze; refcounting still frees it), and every collection walks
        # one run's objects only. The previous run is collected first: it is garbage only now
        # (its objects were still referenced during its own free_memory), and frozen garbage would
        # never be freed.
        gc.collect()
        gc.freeze()
        try:
            run_case(case, results, rank, around)
        except BaseException:  # noqa: BLE001 - any failure: say where, then stop the launch
            (results / f"{case['id']}.rank{rank}.error").write_text(traceback.format_exc())
            print(f"case {case['id']} failed on rank {rank}: see {results}", file=sys.stderr, flush=True)
            process.leave(1)
    destroy_process_group()
    return 0


def read_results(results: Path, case_ids: list[str]) -> dict:
    """id -> {"code", "wall_s"} for the cases that finished (a crashed one has an .error file)."""
    out = {}
    for cid in case_ids:
        meta = results / f"{cid}.json"
        if meta.exists() and not list(results.glob(f"{cid}.rank*.error")):
            out[cid] = json.loads(meta.read_text())
    return out


if __name__ == "__main__":
    process.guard_process()  # before the heavy imports, as the trainer does
    process.leave(run_plan(sys.argv[1]))
