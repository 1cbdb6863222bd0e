"""Time-to-quality: how long (wall time, training examples) until each task's dev metric first
reaches a target — what a user pays for, read from the runs' metrics.jsonl.

    python -m mtbert.bench --quality runs/a runs/b [--targets sst=0.48,quora=0.86,sts=0.875]

Wall time is the dev record's ``time`` (seconds since the run started: loading, evaluation and
checkpoints included); examples are the training examples of the global batches before that
evaluation (the ``examples`` field; runs written before it existed report ``-``). ``all`` is the
first evaluation at which every task with a target had reached it (not the maximum of the
per-task times: a task may fall back below its target later).
"""

from __future__ import annotations

from pathlib import Path

from mtbert.report.runs import RunSummary, load_run

# The recipe's dev targets (README; issue: a recipe that reaches its targets).
DEFAULT_TARGETS = {"sst": 0.48, "quora": 0.86, "sts": 0.875}


def parse_targets(text: str) -> dict[str, float]:
    """``sst=0.48,quora=0.86`` -> {task: target}; a bad item raises ValueError naming it."""
    out = {}
    for item in filter(None, text.split(",")):
        task, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--targets: {item!r} is not TASK=VALUE")
        out[task.strip()] = float(value)
    return out


def first_reached(run: RunSummary, targets: dict[str, float]) -> dict[str, dict | None]:
    """task (and ``all``) -> the first dev record's {step, time_s, examples, value} at or above the
    target, or None if never reached. Tasks the run has no metric for are left out."""
    metrics = run.task_metrics()
    tasks = {t: v for t, v in targets.items() if t in metrics}
    out: dict[str, dict | None] = dict.fromkeys([*tasks, "all"])
    for r in sorted(run.dev, key=lambda r: r["step"]):
        hit = {t: r.get(f"{t}/{metrics[t]}", float("-inf")) >= v for t, v in tasks.items()}
        for t, ok in hit.items():
            if ok and out[t] is None:
                out[t] = {"step": r["step"], "time_s": r.get("time"), "examples": r.get("examples"),
                          "value": r[f"{t}/{metrics[t]}"]}
        if tasks and all(hit.values()) and out["all"] is None:
            out["all"] = {"step": r["step"], "time_s": r.get("time"), "examples": r.get("examples")}
    return out


def _cell(hit: dict | None, best: float | None) -> str:
    if hit is None:
        return "not reached" + (f" (best {best:.3f})" if best is not None else "")
    ex = "-" if hit.get("examples") is None else f"{hit['examples']:,}"
    secs = hit.get("time_s")
    t = "-" if secs is None else f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"
    return f"{t}, {ex} ex (step {hit['step']})"


def table(runs: list[RunSummary], targets: dict[str, float]) -> str:
    tasks = [t for t in targets if any(t in r.task_metrics() for r in runs)]
    head = ["run", "method"] + [f"{t} ≥ {targets[t]}" for t in tasks] + ["all"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        hits, metrics = first_reached(r, targets), r.task_metrics()
        best = {t: max((d.get(f"{t}/{metrics[t]}", float("-inf")) for d in r.dev), default=None)
                for t in tasks if t in metrics}
        name = "/".join(r.path.parts[-2:]) if r.path else r.name  # seed_1 alone would not say which run
        cells = [name, r.method] + [_cell(hits.get(t), best.get(t)) if t in metrics else "-" for t in tasks]
        cells.append(_cell(hits["all"], None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(paths: list[str], targets_text: str) -> str:
    """The time-to-quality table of run directories (a bad path or target raises ValueError)."""
    targets = parse_targets(targets_text) if targets_text else DEFAULT_TARGETS
    runs = []
    for p in paths:
        try:
            runs.append(load_run(Path(p)))
        except FileNotFoundError as e:
            raise ValueError(str(e)) from e
    return table(runs, targets)
