"""Per-task fine-tune ensemble (seed "Improving MinBERT"): from a multitask run's best model,
fine-tune one copy per task on that task alone, then predict each task with its own model.

    accelerate launch -m mtbert.training.ensemble runs/pcgrad [--train.epochs=1 ...]

Writes ``<run>/ensemble/<task>/`` (each fine-tune is an ordinary run directory) and
``<run>/ensemble/predictions/*`` (task t's files from task t's model) plus
``<run>/ensemble/summary.json`` with the ensemble's dev metrics and overall score.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def _reset_accelerate():
    """Each stage builds its own Accelerator; Accelerate keeps a singleton state."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_ensemble(base: Path, overrides: list[str]) -> dict:
    from mtbert.train import main
    cfg = json.loads((base / "config.json").read_text())
    weights = base / "best" / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: the multitask run has no best model yet")
    out = base / "ensemble"
    tasks = cfg["data"]["tasks"]
    per_task = {}
    for task in tasks:
        _reset_accelerate()
        run = out / task
        code = main(["--config", str(base / "config.json"), f"--model.init_weights={weights}",
                     f"--train.train_tasks={task}", f"--train.out_dir={run}", "--method.name=sum",
                     "--train.schedule=round_robin", "--method.pairwise=false", "--method.arrp_batches=0",
                     *overrides])
        if code != 0:
            raise SystemExit(f"ensemble: fine-tuning {task} failed with exit code {code}")
        best = json.loads((run / "summary.json").read_text())["best"]
        per_task[task] = best["metrics"][task]
        for f in (run / "predictions").glob("*.csv"):
            name = f.name.split("-")[0]
            if name == _pred_name(task):
                (out / "predictions").mkdir(parents=True, exist_ok=True)
                shutil.copy(f, out / "predictions" / f.name)
    overall = sum(m["score"] for m in per_task.values()) / len(per_task)
    summary = {"base": str(base), "metrics": per_task, "overall": overall}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _pred_name(task: str) -> str:
    from mtbert.data.tasks import TASKS
    return TASKS[task].pred_name if task in TASKS else task


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m mtbert.training.ensemble RUN_DIR [--section.field=VALUE ...]", file=sys.stderr)
        return 2
    summary = run_ensemble(Path(argv[0]), argv[1:])
    print(f"ensemble overall {summary['overall']:.4f}: " +
          " ".join(f"{t} {m.get('acc', m.get('pearson')):.4f}" for t, m in summary["metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
