"""Rerun the seed reports' method comparison on the real CS224N files with the packaged
checkpoint, under one fixed budget of training examples per method, then write a markdown
table (per-task dev scores, overall, wall time) and plots.

    python launch/compare_methods.py --data-dir ../shared/data/cs224n --steps 60 --out runs/methods
    python launch/compare_methods.py --seeds 3 --only "sum (joint RR),MGDA" --out runs/study   # seed groups

Budget: every method sees the same number of training examples, ``steps x 3 x batch`` (the
round-robin joint run's count): one-task-per-step schedules get 3x the steps, pairs 1.5x,
ARRP's extra largest-task batches come out of its round-robin steps. Wall time differs by
method (SMART costs ~3 forwards per task batch) and is reported. The ensemble fine-tunes the
PCGrad run per task with an extra third of the budget per task, and is marked so.

With ``--seeds N`` every method runs with train.seed 1..N (``OUT/<method>/seed_<s>``); the table
gives the mean over seeds, and ``OUT/compare/stats.md`` (python -m mtbert.compare) the mean ±
95% CI per method and which methods differ from the summed loss at 5% after the correction.
The ensemble is built on the first seed's PCGrad run only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mtbert.methods.registry import METHODS  # noqa: E402  (run as a script from the repo)


def methods(steps: int) -> dict[str, list[str]]:
    """Title -> overrides for every registry method that compare_methods runs, at this budget."""
    return {spec.title: [*spec.overrides, *spec.budget(steps)] for spec in METHODS.values() if spec.compare}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run(args: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, str(ROOT / "mtbert" / "train.py"), *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"run failed ({code}); see {log}")
    return time.time() - t0


def finished(run_dir: Path, overrides: list[str]) -> bool:
    """A finished run of exactly these overrides (its config.json equals theirs, less the
    settings that do not change what is trained)."""
    if not (run_dir / "summary.json").exists():
        return False
    from mtbert.config.cli import parse_args
    from mtbert.config.schema import to_dict
    from mtbert.training.resume import run_settings
    want = run_settings(json.loads(json.dumps(to_dict(parse_args(overrides)))), 1, "")
    have = run_settings(json.loads((run_dir / "config.json").read_text()), 1, "")
    if want.get("train.idle_params") == "auto":  # resolved to `keep` in config.json (1 process, no DeepSpeed)
        want["train.idle_params"] = "keep"
    return want == have


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cs224n"))
    ap.add_argument("--steps", type=int, default=60, help="round-robin steps of the joint run (the budget)")
    ap.add_argument("--max-eval", type=int, default=600, help="dev examples per task for the table")
    ap.add_argument("--out", type=Path, default=Path("runs/methods"))
    ap.add_argument("--only", default="", help="comma-separated subset of method titles")
    ap.add_argument("--seeds", type=int, default=1, help="runs per method, train.seed 1..N (seed groups)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs in OUT that finished with the same settings (summary.json written, same "
                         "config.json) and run only the others: a long comparison can be continued")
    args = ap.parse_args(argv)
    common = [f"--data.dir={args.data_dir}", "--train.epochs=1", "--train.lr=1e-4", "--data.batch_size=32", "--train.progress=false",
              f"--data.max_eval={args.max_eval}", "--heads.quora.kind=cross", "--train.resume=false",
              "--train.predict_test=false"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, dirs, runs = [], {}, []
    for name, extra in methods(args.steps).items():
        if args.only and name not in args.only.split(","):
            continue
        scores = []
        for seed in range(1, args.seeds + 1):
            d = args.out / slug(name) / f"seed_{seed}" if args.seeds > 1 else args.out / slug(name)
            overrides = [*common, *extra, f"--train.out_dir={d}"] + ([f"--train.seed={seed}"] if args.seeds > 1 else [])
            log = d.parent / f"{d.name}.log" if args.seeds > 1 else args.out / f"{slug(name)}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            if args.resume and finished(d, overrides):
                wall = json.loads((d / "summary.json").read_text())["wall_s"]
                print(f"{name} seed {seed}: kept the finished run in {d}", flush=True)
            else:
                wall = run(overrides, log)
            dirs.setdefault(name, d)  # the first seed's run (the ensemble's base)
            runs.append(d)
            best = json.loads((d / "summary.json").read_text())["best"]
            scores.append((best["metrics"], best["overall"], wall))
            print(f"{name} seed {seed}: overall {best['overall']:.4f} in {wall / 60:.1f} min", flush=True)
        mean = {t: {k: sum(s[0][t][k] for s in scores) / len(scores) for k in scores[0][0][t]} for t in scores[0][0]}
        rows.append((name + (f" (mean of {len(scores)} seeds)" if len(scores) > 1 else ""), mean,
                     sum(s[1] for s in scores) / len(scores), sum(s[2] for s in scores) / len(scores)))
    pcgrad = METHODS["pcgrad"].title
    if pcgrad in dirs:
        base = dirs[pcgrad]
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "mtbert.training.ensemble", str(base),
                              f"--train.epoch_steps={max(1, args.steps // 3)}", "--train.progress=false"],
                             cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"ensemble failed:\n{res.stderr[-3000:]}")
        ens = json.loads((base / "ensemble" / "summary.json").read_text())
        rows.append((f"{METHODS['ensemble'].title}, +1/3 budget per task", ens["metrics"], ens["overall"],
                     time.time() - t0))
    tasks = ["sst", "quora", "sts"]
    lines = ["| method | SST acc | Quora acc | STS r | overall | wall min (per run) |", "|---|---|---|---|---|---|"]
    for name, m, overall, wall in sorted(rows, key=lambda r: -r[2]):
        cells = [f"{m[t].get('acc', m[t].get('pearson')):.3f}" if t in m else "-" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall:.4f} | {wall / 60:.1f} |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(
        f"Budget: {args.steps} round-robin steps x 3 tasks x 32 examples per method; dev sets capped at "
        f"{args.max_eval} examples per task; all-MiniLM-L6-v2 on 2 CPU cores. Quora numbers are on the carved "
        f"16k/4.2k split, not comparable with published CS224N Quora dev numbers.\n\n{table}\n")
    print(table)
    subprocess.run([sys.executable, "-m", "mtbert.compare", *map(str, runs), "--out", str(args.out / "compare")],
                   cwd=ROOT, check=True, capture_output=True)
    if args.seeds > 1:
        print((args.out / "compare" / "stats.md").read_text())
    print(f"wrote {args.out / 'results.md'} and plots in {args.out / 'compare'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
