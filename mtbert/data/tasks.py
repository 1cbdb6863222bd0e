"""The task registry: a plain dict of TaskSpec. Built in: sst, cfimdb, quora, sts.

A user adds a task by config alone (``--task_defs.<name>.*``, see config.TaskDefCfg);
``build_specs`` turns those into TaskSpecs next to the built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtbert.errors import ConfigError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # single_classification | pair_classification | pair_regression
    num_labels: int = 2  # classes (classification); 1 for regression
    label_range: tuple[float, float] = (0.0, 1.0)
    files: dict = field(default_factory=dict)  # split -> file name (cs224n) or hub split
    columns: dict = field(default_factory=dict)  # role (id, text_a, text_b, label) -> column
    pred_name: str = ""  # predictions/{pred_name}-{split}-output.csv
    pred_header: str = "Predicted_Label"
    source: str = "cs224n"  # cs224n | hub
    hub: tuple[str, str] = ("", "")  # (dataset name, config)

    @property
    def pair(self) -> bool:
        return self.kind != "single_classification"

    @property
    def default_head(self) -> str:
        if not self.pair:
            return "linear"
        return "cosine" if self.kind == "pair_regression" else "bi"

    @property
    def default_loss(self) -> str:
        if self.kind == "pair_regression":
            return "mse"
        return "bce" if self.num_labels == 2 else "ce"

    def metric(self, preds, golds) -> dict[str, float]:
        """{'acc': ...} for classification, {'pearson': ...} for regression, plus 'score' in [0, 1]."""
        p, g = np.asarray(preds, dtype=float), np.asarray(golds, dtype=float)
        if self.kind == "pair_regression":
            # numpy, not scipy.stats.pearsonr: importing scipy.stats costs 0.6 s per process start
            r = float(np.corrcoef(p, g)[0, 1]) if len(p) > 1 and p.std() > 0 and g.std() > 0 else 0.0
            return {"pearson": r, "score": (r + 1) / 2}
        acc = float((p == g).mean()) if len(p) else 0.0
        return {"acc": acc, "score": acc}


_SINGLE = {"id": "id", "text_a": "sentence", "label": "sentiment"}
TASKS: dict[str, TaskSpec] = {
    "sst": TaskSpec("sst", "single_classification", 5, (0, 4), columns=_SINGLE, pred_name="sst",
                    pred_header="Predicted_Sentiment",
                    files={"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv",
                           "test": "ids-sst-test-student.csv"}),
    "cfimdb": TaskSpec("cfimdb", "single_classification", 2, (0, 1), columns=_SINGLE, pred_name="cfimdb",
                       pred_header="Predicted_Sentiment",
                       files={"train": "ids-cfimdb-train.csv", "dev": "ids-cfimdb-dev.csv",
                              "test": "ids-cfimdb-test-student.csv"}),
    "quora": TaskSpec("quora", "pair_classification", 2, (0, 1), pred_name="para",
                      pred_header="Predicted_Is_Paraphrase",
                      columns={"id": "id", "text_a": "sentence1", "text_b": "sentence2", "label": "is_duplicate"},
                      files={"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"}),
    "sts": TaskSpec("sts", "pair_regression", 1, (0.0, 5.0), pred_name="sts",
                    pred_header="Predicted_Similiary",  # sic: the course's header
                    columns={"id": "id", "text_a": "sentence1", "text_b": "sentence2", "label": "similarity"},
                    files={"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test-student.csv"}),
}


def parse_columns(text: str, where: str) -> dict:
    cols = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, _, col = part.partition(":")
        if role not in ("id", "text_a", "text_b", "label") or not col:
            raise ConfigError(f"{where}: bad column mapping {part!r}; use role:column with roles id, text_a, text_b, "
                              f"label")
        cols[role] = col
    return cols


def build_specs(cfg) -> dict[str, TaskSpec]:
    """TaskSpecs for cfg.data.tasks, in order: built-in or from cfg.task_defs."""
    specs = {}
    for name in cfg.data.tasks:
        if name in cfg.task_defs:
            d, where = cfg.task_defs[name], f"task_defs.{name}"
            defaults = {"id": "id", "text_a": "sentence1" if d.kind != "single_classification" else "sentence",
                        "label": "label"}
            if d.kind != "single_classification":
                defaults["text_b"] = "sentence2"
            columns = {**defaults, **parse_columns(d.columns, f"{where}.columns")}
            if not d.train or not d.dev:
                raise ConfigError(f"{where}: set both train and dev")
            regression = d.kind == "pair_regression"
            specs[name] = TaskSpec(
                name, d.kind, 1 if regression else d.num_labels,
                (d.label_min, d.label_max) if regression else (0, d.num_labels - 1),
                files={k: v for k, v in (("train", d.train), ("dev", d.dev), ("test", d.test)) if v},
                columns=columns, pred_name=name, source=d.source, hub=(d.hub_name, d.hub_config))
        else:
            specs[name] = TASKS[name]
    return specs
