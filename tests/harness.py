"""Launch groups: many trainer runs per ``accelerate launch`` (tests/helpers/run_cases.py).

A ``Case`` is one trainer configuration (its overrides) with a unique id; ``run_group`` launches
every case of one (accelerate config, number of processes) in a single launch, in turn, and
returns a ``CaseResult`` per case. When a case crashes (an exception, a rank killed, the launch
timed out), that case is reported as crashed with the logs and the launch is started again for
the cases after it, so one broken case never hides the others' results.

Cases of one launch share the process group (the launcher's, like any run) and nothing else:
each builds its own Accelerator, model, optimizer, sampler, RNG state and engine.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "helpers" / "run_cases.py"
LAUNCHES: list[dict] = []  # every launch of this test run: config, processes, cases, seconds (conftest prints it)


@dataclass
class Case:
    id: str
    args: list[str]
    fault: dict = field(default_factory=dict)  # run_cases.py's fault injection (nan_calls, nan_ranks)
    env: dict | None = None  # launch_env of the case's config, in a launch that mixes configs


MANAGED = ("ACCELERATE_", "FSDP_")  # the launch variables a case's config decides


@functools.lru_cache(maxsize=None)
def _launch_env(config: str, processes: int) -> tuple:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "accelerate_configs" / config),
                                               "--num_processes", str(processes), "--main_process_port", "0", "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command prepares it
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields + ["mixed_precision"] * mp_from_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(MANAGED)))


def launch_env(config: str, processes: int) -> dict:
    """The ACCELERATE_* / FSDP_* variables ``accelerate launch --config_file <config>`` gives its
    ranks, computed by Accelerate's own launch code (not copied): what makes a case of a mixed
    launch run the engine of its config."""
    return dict(_launch_env(config, processes))


@dataclass
class CaseResult:
    code: int | None  # the trainer's exit code; None: the case crashed (see log)
    log: str  # the case's console output (every rank), or the launch's output when it crashed
    wall_s: float = 0.0
    launch: dict = field(default_factory=dict)

    @property
    def crashed(self) -> bool:
        return self.code is None


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, processes: int, cases: list[Case], folder: Path, timeout: float):
    plan = folder / f"plan-{len(list(folder.glob('plan-*.json')))}.json"
    keys = sorted({k for c in cases for k in (c.env or {})})
    plan.write_text(json.dumps({"results": str(folder), "cases": [
        {"id": c.id, "args": c.args, **c.fault, **({"env": c.env, "env_keys": keys} if c.env is not None else {})}
        for c in cases]}))
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / config), "--main_process_port", str(_free_port()),
           "--num_processes", str(processes), str(WORKER), str(plan)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:  # the ranks die with the launcher (PR_SET_PDEATHSIG)
        code, output = None, f"launch timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    LAUNCHES.append({"config": config, "processes": processes, "cases": len(cases),
                     "seconds": round(time.time() - start, 1)})
    return code, output


def _logs(folder: Path, case_id: str) -> str:
    parts = []
    for f in sorted(folder.glob(f"{case_id}.rank*.log")) + sorted(folder.glob(f"{case_id}.rank*.error")):
        parts.append(f"--- {f.name}\n{f.read_text()}")
    return "\n".join(parts)


def in_launches(cases: list, launch, finished) -> dict:
    """Run ``cases`` (objects with an ``id``) in as few launches as crashes allow.
    launch(remaining) -> (exit code or None, output); finished(case) -> a result, or None when the
    case did not finish. A launch that ends early marks the first unfinished case crashed (the
    cases run in order) and the rest go into the next launch. -> id -> result, or
    ("crashed", output) for a crashed case."""
    assert len({c.id for c in cases}) == len(cases), "case ids must be unique"
    results, remaining = {}, list(cases)
    while remaining:
        code, output = launch(remaining)
        for case in list(remaining):
            got = finished(case)
            if got is None:
                break
            results[case.id] = got
            remaining.remove(case)
        if remaining:
            if code == 0:
                raise AssertionError(f"a launch exited 0 without finishing {remaining[0].id}:\n{output[-4000:]}")
            results[remaining.pop(0).id] = ("crashed", f"(launch exit {code})\n{output[-6000:]}")
    return results


def run_group(config: str, processes: int, cases: list[Case], folder: Path,
              seconds_per_case: float = 60) -> dict[str, CaseResult]:
    """Every case, in order, in one launch of ``config`` with ``processes`` ranks (more only
    after a crash). -> id -> CaseResult."""
    folder.mkdir(parents=True, exist_ok=True)
    launch = {"config": config, "processes": processes}

    def start(remaining):
        code, output = _launch(config, processes, remaining, folder, 60 + seconds_per_case * len(remaining))
        launch["exit"] = code
        return code, output

    def finished(case):
        meta = folder / f"{case.id}.json"
        if not meta.exists() or list(folder.glob(f"{case.id}.rank*.error")):
            return None
        info = json.loads(meta.read_text())
        return CaseResult(info["code"], _logs(folder, case.id), info["wall_s"], dict(launch))

    out = in_launches(cases, start, finished)
    return {k: v if isinstance(v, CaseResult) else CaseResult(None, f"{_logs(folder, k)}\n--- launch output {v[1]}",
                                                              0.0, dict(launch))
            for k, v in out.items()}
