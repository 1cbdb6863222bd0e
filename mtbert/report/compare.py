"""Compare runs: a ranked table and plots from run directories (or a W&B group).

    python -m mtbert.compare runs/sweep/trial_* [--out runs/sweep/compare] [--analysis]
    python -m mtbert.compare --wandb-group ENTITY/PROJECT/GROUP --out compare/

Reads each run's config.json, metrics.jsonl and summary.json (nothing depends on W&B).
Writes ``table.md`` (ranked by best dev overall), ``dev_curves.png`` (one panel per task,
a line per run), ``final_scores.png`` (best dev score per task and run), and for the seed
groups (runs differing only in ``train.seed``: mtbert/report/seed_groups.py) ``stats.md`` (mean ± 95%
CI and n, differences to ``--reference`` tested on the dev predictions) and
``group_scores.png`` (error bars); with
``--analysis`` also each run's analysis report (mtbert/report/analysis.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtbert.report.runs import RunSummary, load_run, load_wandb_group


def table(runs: list[RunSummary]) -> str:
    tasks = sorted({t: m for r in runs for t, m in r.task_metrics().items()}.items())
    head = ["rank", "run", "method"] + [f"{t} {m}" for t, m in tasks] + ["overall", "steps", "wall min", "ex/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = sorted(runs, key=lambda r: r.best().get("overall", -1), reverse=True)
    for i, r in enumerate(ranked, 1):
        b = r.best()
        cells = [str(i), r.name, r.method] + [f"{b[f'{t}/{m}']:.3f}" if f"{t}/{m}" in b else "-" for t, m in tasks]
        cells += [f"{b.get('overall', float('nan')):.4f}", str(r.steps), f"{r.wall_s / 60:.1f}", f"{r.examples_per_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _legend(r: RunSummary, runs: list[RunSummary]) -> str:
    """The method's title; with the run's name where several runs share a title."""
    return r.method if sum(o.method == r.method for o in runs) == 1 else f"{r.method} ({r.name})"


def _score_bars(plt, runs: list[RunSummary], tasks: list):
    """One horizontal bar chart per task (and overall): a row per run, sorted by overall, the
    axis zoomed to the scores' range so that differences of 0.01 show (legible for 25 runs)."""
    order = sorted(runs, key=lambda r: r.best().get("overall", 0.0))
    cols = [(f"{t}/{m}", f"{t} {m}") for t, m in tasks] + [("overall", "overall")]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 2.5, 0.28 * len(runs) + 1.2),
                             sharey=True, squeeze=False)
    for ax, (key, title) in zip(axes[0], cols):
        vals = [r.best().get(key, 0.0) for r in order]
        ax.barh(range(len(order)), vals, color="tab:blue")
        lo, hi = min(vals), max(vals)
        ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 1e-3) - 0.01), hi + 0.1 * (hi - lo + 1e-3) + 0.005)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(order)), [_legend(r, runs) for r in order], fontsize=7)
    axes[0][0].set_ylabel("best dev score per run")
    fig.tight_layout()
    return fig


def plot(runs: list[RunSummary], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({t: m for r in runs for t, m in r.task_metrics().items()}.items())
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.6), squeeze=False)
    for ax, (task, metric) in zip(axes[0], tasks + [("overall", "")]):
        for r in runs:
            xs, ys = ([d["step"] for d in r.dev], [d["overall"] for d in r.dev]) if task == "overall" else r.curve(task, metric)
            ax.plot(xs, ys, marker="o", ms=3, label=_legend(r, runs))
        ax.set_title(f"{task} {metric}".strip())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    curves = out / "dev_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig = _score_bars(plt, runs, tasks)
    bars = out / "final_scores.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [curves, bars]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="run directories")
    ap.add_argument("--wandb-group", default="", help="ENTITY/PROJECT/GROUP instead of run directories")
    ap.add_argument("--out", type=Path, default=None, help="where table.md and the plots go (default: next to the runs)")
    ap.add_argument("--analysis", action="store_true", help="also write each run's analysis report")
    ap.add_argument("--reference", default="", help="the group the others are tested against (a group label or "
                    "method title; default: the summed loss)")
    ap.add_argument("--rounds", type=int, default=2000, help="bootstrap rounds of the paired test")
    args = ap.parse_args(argv)
    if not args.runs and not args.wandb_group:
        ap.error("give run directories or --wandb-group")
    try:
        runs = load_wandb_group(args.wandb_group) if args.wandb_group else [load_run(p) for p in args.runs]
    except FileNotFoundError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    out = args.out or (args.runs[0].parent / "compare" if args.runs else Path("compare"))
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out / "table.md").write_text(text + "\n")
    print(text)
    for p in plot(runs, out):
        print(f"wrote {p}")
    from mtbert.report.seed_groups import report
    try:
        print("\n" + report(runs, out, args.reference, args.rounds))
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'stats.md'} and {out / 'group_scores.png'}")
    if args.analysis:
        from mtbert.report.analysis import write_report
        for path in args.runs:
            print(f"wrote {write_report(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
