"""A run's analysis report (seed "Post-Op BERT", figures 2-4): confusion matrices for the
classification tasks, predicted-vs-gold scatter for regression tasks with error bands, and
the worst dev examples per task, from the run's dev prediction files and the gold dev data.

    python -m mtbert.report.analysis RUN_DIR        # writes RUN_DIR/analysis/{report.md, *.png}
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def read_predictions(path: Path) -> dict[str, float]:
    lines = path.read_text().splitlines()[1:]
    return {i.strip(): float(p) for i, p in (line.split(" , ") for line in lines if " , " in line)}


def gold_dev(run_dir: Path):
    """task -> (spec, {id: Example}) for the run's tasks, read like the trainer reads them."""
    from mtbert.config.cli import load_file
    from mtbert.config.schema import Config
    from mtbert.data.batching import task_file
    from mtbert.data.cs224n import read_cs224n
    from mtbert.data.tasks import build_specs
    cfg = Config()
    load_file(cfg, str(run_dir / "config.json"))
    out = {}
    for name, spec in build_specs(cfg).items():
        if spec.source != "cs224n":
            continue
        examples, _ = read_cs224n(task_file(spec, "dev", cfg), spec, True, skip_bad_rows=True)
        out[name] = (spec, {e.id: e for e in examples})
    return out


def _regression_section(ax, task: str, spec, p: np.ndarray, g: np.ndarray) -> list[str]:
    """Scatter of predicted vs gold, the mean prediction (±1 sd) per gold bin; Pearson r and MAE."""
    r = float(np.corrcoef(p, g)[0, 1]) if len(p) > 1 else float("nan")
    ax.scatter(g, p, s=6, alpha=0.4)
    bins = np.linspace(*spec.label_range, 11)
    centers, mean, sd = [], [], []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (g >= lo) & (g <= hi)
        if sel.sum() > 2:
            centers.append((lo + hi) / 2)
            mean.append(p[sel].mean())
            sd.append(p[sel].std())
    centers, mean, sd = map(np.array, (centers, mean, sd))
    ax.plot(centers, mean, color="C1", label="mean prediction")
    ax.fill_between(centers, mean - sd, mean + sd, color="C1", alpha=0.25, label="±1 sd")
    ax.plot(spec.label_range, spec.label_range, "k--", lw=0.8, label="ideal")
    ax.set_xlabel("gold")
    ax.set_ylabel("predicted")
    ax.set_title(f"{task}: Pearson {r:.3f}")
    ax.legend(fontsize=7)
    return [f"Pearson r = {r:.4f}; mean absolute error {np.abs(p - g).mean():.3f}."]


def _classification_section(ax, task: str, spec, p: np.ndarray, g: np.ndarray) -> list[str]:
    """The confusion matrix, drawn and as a table; accuracy."""
    n = int(spec.num_labels)
    cm = np.zeros((n, n), dtype=int)
    for a, b in zip(g.astype(int), p.astype(int)):
        cm[a, b] += 1
    ax.imshow(cm, cmap="Blues")
    for a in range(n):
        for b in range(n):
            ax.text(b, a, cm[a, b], ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{task}: accuracy {(p == g).mean():.3f}")
    lines = [f"Accuracy {(p == g).mean():.4f}. Confusion matrix (rows gold, columns predicted):", ""]
    lines += ["| gold \\ pred | " + " | ".join(map(str, range(n))) + " |", "|---" * (n + 1) + "|"]
    return lines + [f"| {a} | " + " | ".join(map(str, cm[a])) + " |" for a in range(n)]


def write_report(run_dir: Path, worst: int = 8) -> Path:
    """``<run>/analysis/report.md``: a section per task (its plot, its numbers, its worst examples)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Analysis of {run_dir.name}", ""]
    for task, (spec, gold) in gold_dev(run_dir).items():
        pred_file = run_dir / "predictions" / f"{spec.pred_name}-dev-output.csv"
        if not pred_file.exists():
            continue
        preds = read_predictions(pred_file)
        ids = [i for i in preds if i in gold]
        p = np.array([preds[i] for i in ids])
        g = np.array([gold[i].label for i in ids])
        lines.append(f"## {task} ({len(ids)} dev examples)")
        fig, ax = plt.subplots(figsize=(4.4, 4))
        section = _regression_section if spec.kind == "pair_regression" else _classification_section
        lines += section(ax, task, spec, p, g)
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=110)
        plt.close(fig)
        lines += ["", f"![{task}]({task}.png)", "", f"Worst {worst} dev examples (largest |prediction - gold|):", "",
                  "| id | gold | predicted | text |", "|---|---|---|---|"]
        order = np.argsort(-np.abs(p - g), kind="stable")[:worst]
        for j in order:
            e = gold[ids[j]]
            text = e.text_a if e.text_b is None else f"{e.text_a} ‖ {e.text_b}"
            lines.append(f"| {e.id[:8]} | {g[j]:g} | {p[j]:g} | {text[:160].replace('|', '/')} |")
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m mtbert.report.analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a run directory (holds config.json and predictions/)")
    ap.add_argument("--worst", type=int, default=8, help="dev examples with the largest error listed per task")
    args = ap.parse_args(argv)
    missing = [n for n in ("config.json", "predictions") if not (args.run_dir / n).exists()]
    if missing:
        print(f"analysis: {args.run_dir}: not a finished run directory (no {' or '.join(missing)})", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
