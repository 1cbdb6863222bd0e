"""A finished (or running) run as the comparisons read it: its config.json, metrics.jsonl and
summary.json (or a W&B run's history), never the trainer's objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mtbert.methods import registry

METRIC_KEYS = ("acc", "pearson")


@dataclass
class RunSummary:
    name: str
    method: str
    dev: list[dict] = field(default_factory=list)  # dev records from metrics.jsonl
    steps: int = 0
    wall_s: float = 0.0
    examples_per_s: float = 0.0
    cfg: dict = field(default_factory=dict)  # config.json (W&B: the run's config)
    path: Path | None = None  # the run directory (None for W&B runs: no prediction files)

    def task_metrics(self) -> dict[str, str]:
        """task -> its metric key (acc or pearson), from the records."""
        out = {}
        for r in self.dev:
            for k in r:
                task, _, metric = k.partition("/")
                if metric in METRIC_KEYS:
                    out[task] = metric
        return out

    def best(self) -> dict:
        """The dev record with the best overall score (what the trainer keeps as best/)."""
        return max(self.dev, key=lambda r: r["overall"]) if self.dev else {}

    def curve(self, task: str, metric: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[f"{task}/{metric}"]) for r in self.dev if f"{task}/{metric}" in r]
        return [p[0] for p in pts], [p[1] for p in pts]


def method_label(cfg: dict) -> str:
    return registry.label(cfg)


def load_run(path: Path) -> RunSummary:
    if not (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is it a run directory?)")
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    run = RunSummary(path.name, method_label(cfg), [r for r in records if r.get("split") == "dev"], cfg=cfg, path=path)
    train = [r for r in records if r.get("split") == "train"]
    if train:
        run.steps = max(r["step"] for r in train)
        run.examples_per_s = sum(r.get("examples_per_s", 0) for r in train) / len(train)
    summary = path / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        run.wall_s, run.steps = s.get("wall_s", 0.0), s.get("steps", run.steps)
    elif records:
        run.wall_s = max(r.get("time", 0) for r in records)
    return run


def load_wandb_group(spec: str) -> list[RunSummary]:
    """ENTITY/PROJECT/GROUP -> runs, from W&B's API (needs network and a login)."""
    import wandb
    entity, project, group = spec.split("/")
    runs = []
    for r in wandb.Api().runs(f"{entity}/{project}", filters={"group": group}):
        dev = [{k.removeprefix("dev/"): v for k, v in row.items() if k.startswith("dev/")} | {"step": row["_step"]}
               for row in r.scan_history() if "dev/overall" in row]
        runs.append(RunSummary(r.name, method_label(r.config), dev, int(r.summary.get("_step", 0)),
                               float(r.summary.get("_runtime", 0.0)), cfg=dict(r.config)))
    return runs
