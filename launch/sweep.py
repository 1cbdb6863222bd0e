"""Expand a sweep spec (YAML or TOML) into a sweep file of override lines, then submit it to
Slurm as a job array or run the trials here one by one.

    python launch/sweep.py launch/sweeps/example.yaml                  # just write runs/<name>/sweep.txt
    python launch/sweep.py SPEC --local [--accel-config accelerate_configs/cpu_2proc.yaml] [--trials 2]
    python launch/sweep.py SPEC --submit -- --partition=gpu --gres=gpu:1 --time=02:00:00   # after --: sbatch options

Spec keys: name, base (list of overrides for every trial), grid (key -> list of values; all
combinations), trials (a list of key -> value maps, one trial each: hand-picked combinations),
random (n, params: key -> list of choices | {uniform: [a, b]} | {log_uniform: [a, b]}), seed.
Trial i writes to runs/<name>/trial_<i> and is grouped as <name> in W&B.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import shlex
import subprocess
import sys
from pathlib import Path


def load_spec(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        return tomllib.loads(text)
    import yaml
    return yaml.safe_load(text)


def _draw(rng: random.Random, choice):
    if isinstance(choice, list):
        return rng.choice(choice)
    if "uniform" in choice:
        a, b = choice["uniform"]
        return rng.uniform(a, b)
    if "log_uniform" in choice:
        a, b = choice["log_uniform"]
        return math.exp(rng.uniform(math.log(a), math.log(b)))
    raise ValueError(f"unknown random choice {choice!r}: a list, {{uniform: [a, b]}} or {{log_uniform: [a, b]}}")


def expand(spec: dict, root: Path = Path("runs")) -> list[str]:
    """-> one line of overrides per trial."""
    name = spec.get("name") or "sweep"
    grid = spec.get("grid") or {}
    trials = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    listed = spec.get("trials") or []
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise ValueError("trials: a list of maps (key: value), one per trial")
    trials += [dict(t) for t in listed]
    rnd = spec.get("random") or {}
    rng = random.Random(spec.get("seed", 0))
    for _ in range(int(rnd.get("n", 0))):
        trials.append({k: _draw(rng, c) for k, c in (rnd.get("params") or {}).items()})
    if not trials:
        trials = [{}]
    lines = []
    for i, trial in enumerate(trials):
        words = [f"--train.out_dir={root / name / f'trial_{i}'}", f"--log.group={name}",
                 f"--log.name={name}-{i}", *spec.get("base", [])]
        words += [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in trial.items()]
        lines.append(" ".join(shlex.quote(w) for w in words))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path)
    ap.add_argument("--root", type=Path, default=Path("runs"), help="where trial run directories go")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the trials here, one after another")
    mode.add_argument("--submit", action="store_true", help="sbatch slurm/sweep.sbatch as a job array")
    ap.add_argument("--accel-config", default="", help="accelerate config for --local / the array tasks")
    ap.add_argument("--trials", default="",
                    help="only these trial numbers (e.g. 2 or 0,3); the sweep file still lists every trial")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: sbatch options
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.sbatch_args = extra
    try:
        spec = load_spec(args.spec)
        lines = expand(spec, args.root)
    except Exception as e:  # missing file, YAML/TOML syntax, a bad random choice: say which, exit 2
        print(f"sweep: {args.spec}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        chosen = {int(i) for i in args.trials.split(",") if i.strip()}
    except ValueError:
        chosen = {-1}
    if not chosen <= set(range(len(lines))):
        print(f"sweep: --trials {args.trials}: the sweep has trials 0-{len(lines) - 1}", file=sys.stderr)
        return 2
    out = args.root / (spec.get("name") or "sweep")
    out.mkdir(parents=True, exist_ok=True)
    sweep_file = out / "sweep.txt"
    sweep_file.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} trials -> {sweep_file}")
    if args.submit:
        # The sweep file (and accelerate config) are arguments of the script, not --export
        # variables: a user's own --export=... after -- replaces sbatch's, and would drop them.
        array = ",".join(map(str, sorted(chosen))) if chosen else f"0-{len(lines) - 1}"
        cmd = ["sbatch", "--parsable", f"--array={array}", *args.sbatch_args, "slurm/sweep.sbatch",
               str(sweep_file.resolve()), *([args.accel_config] if args.accel_config else [])]
        job = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        print(f"submitted array job {job}")
    elif args.local:
        failed = 0
        for i, line in enumerate(lines):
            if chosen and i not in chosen:
                continue
            # this interpreter's accelerate (a bare `accelerate` needs the venv on PATH)
            launcher = [sys.executable, "-m", "accelerate.commands.launch"] + (
                ["--config_file", args.accel_config] if args.accel_config else ["--num_processes", "1"])
            print(f"[trial {i}] {line}", flush=True)
            failed += subprocess.run([*launcher, "mtbert/train.py", *shlex.split(line)]).returncode != 0
        ran = len(chosen or lines)
        print(f"{ran - failed}/{ran} trials finished; compare: python -m mtbert.compare {out}/trial_*")
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
