"""Seed groups for ``python -m mtbert.compare``: runs whose configs differ only in ``train.seed``
(and in settings that do not change the weights) form one group. The statistical table gives
each group's mean ± 95% t-interval and n per task and overall, and compares every group with a
reference group (default: the summed loss) by mtbert/report/stats.py's two-level test on the runs'
saved dev predictions (``predictions/*-dev-output.csv`` against ``*-dev-gold.csv``), marking the
differences significant at 5% after the Benjamini-Hochberg correction. Without prediction files
(W&B groups, runs from before the gold files) only the seed level is tested.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtbert.report import stats
from mtbert.report.runs import RunSummary

# Settings that do not change what is trained (mtbert/training/resume.py's FREE_TO_CHANGE), and the seed.
NOT_A_SETTING = {
    "train.out_dir", "train.resume", "train.progress", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_last", "train.max_bad_steps", "train.compile", "train.predict_test",
    "data.dir", "data.eval_batch_size", "method.conflict_stats", "log", "train.seed",
}
SHOWN_BY_TITLE = ("method.", "train.schedule", "model.sharing")  # the registry title names these


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass
class Group:
    key: tuple
    runs: list[RunSummary] = field(default_factory=list)
    label: str = ""

    def seed_scores(self, key: str) -> list[float]:
        return [r.best()[key] for r in self.runs if key in r.best()]


def group_runs(runs: list[RunSummary]) -> list[Group]:
    """Runs -> groups (in first-seen order), labelled by the method title and the settings that
    vary between groups (``train.lr=0.0001``), never ``trial_3``."""
    from mtbert.config.schema import Config, to_dict
    # A field added after a run was made is missing from its config.json; the run trained with the
    # field's default (a new field's default keeps the old behaviour), so it counts as that value.
    defaults = flatten(to_dict(Config()))
    groups: dict[tuple, Group] = {}
    for r in runs:
        flat = {k: v for k, v in {**defaults, **flatten(r.cfg)}.items()
                if k not in NOT_A_SETTING and k.split(".")[0] != "log"}
        key = (r.method, tuple(sorted((k, repr(v)) for k, v in flat.items())))
        groups.setdefault(key, Group(key)).runs.append(r)
    # A setting is named where it tells apart groups of the same method (an lr sweep); settings
    # that differ only between methods (their budgets: epochs, batch size) are the method's.
    keys = {k for g in groups.values() for k, _ in g.key[1]}
    shown = sorted(k for k in keys if not k.startswith(SHOWN_BY_TITLE) and any(
        len({dict(g.key[1]).get(k) for g in groups.values() if g.key[0] == title}) > 1
        for title in {g.key[0] for g in groups.values()}))
    for g in groups.values():
        vals = dict(g.key[1])
        extra = ", ".join(f"{k.split('.', 1)[-1]}={vals.get(k, '-')}" for k in shown)
        g.label = g.key[0] + (f" ({extra})" if extra else "")
    return list(groups.values())


def _read(path: Path) -> dict[str, str]:
    with open(path) as f:
        rows = list(csv.reader(f, delimiter=","))[1:]
    return {r[0].strip(): r[1].strip() for r in rows if len(r) >= 2}


def predictions(group: Group, task: str, metric: str) -> stats.TaskPredictions | None:
    """The group's per-seed dev predictions of ``task`` aligned with the gold file; None if a
    run lacks them (or the runs were evaluated on other examples)."""
    rows, gold_ids, gold = [], None, None
    for r in group.runs:
        found = list(r.path.glob("predictions/*-dev-gold.csv")) if r.path else []
        mine = [g for g in found if open(g).readline().split("\t")[-1].strip() == f"Gold_{task}"]
        if not mine:
            return None
        g = _read(mine[0])
        out = mine[0].with_name(mine[0].name.replace("-dev-gold.csv", "-dev-output.csv"))
        if not out.exists():
            return None
        pred = _read(out)
        ids = sorted(g)
        if gold_ids is None:
            gold_ids, gold = ids, np.array([float(g[i]) for i in ids])
        elif ids != gold_ids:
            return None
        rows.append([float(pred[i]) for i in ids])
    return stats.TaskPredictions(metric, np.array(rows), gold)


def tasks_of(runs: list[RunSummary]) -> list[tuple[str, str]]:
    return sorted({t: m for r in runs for t, m in r.task_metrics().items()}.items())


def compare_to(groups: list[Group], reference: Group, tasks: list[tuple[str, str]], rounds: int = 2000) -> dict:
    """(group label, key) -> test result vs the reference, with ``q`` (BH-adjusted p)."""
    results = {}
    ref_preds = {t: predictions(reference, t, m) for t, m in tasks}
    for g in groups:
        if g is reference:
            continue
        preds = {t: predictions(g, t, m) for t, m in tasks}
        both = [t for t, _ in tasks if preds[t] is not None and ref_preds[t] is not None]
        res = stats.compare_groups({t: preds[t] for t in both}, {t: ref_preds[t] for t in both}, rounds) if both else {}
        for key in [t for t, _ in tasks] + ["overall"]:
            if key not in res:  # no predictions: the seed level alone, on the best dev scores
                metric = dict(tasks).get(key)
                name = "overall" if key == "overall" else f"{key}/{metric}"
                a, b = g.seed_scores(name), reference.seed_scores(name)
                if not a or not b:
                    continue
                res[key] = stats.seed_test(np.array(a), np.array(b))
            if res[key] is not None and not np.isnan(res[key]["p"]):  # (one seed: untested, not corrected for)
                results[(g.label, key)] = res[key]
    for (k, r), q in zip(results.items(), stats.adjust([r["p"] for r in results.values()])):
        r["q"] = q
    return results


def stats_table(groups: list[Group], reference: Group, results: dict, tasks: list[tuple[str, str]]) -> str:
    """Mean ± CI (n) per task and overall; ``*`` where the difference to the reference is
    significant at 5% after the correction (its sign given: + better, - worse)."""
    cols = [(f"{t}/{m}", t, f"{t} {m}") for t, m in tasks] + [("overall", "overall", "overall")]
    head = ["group", "n"] + [c[2] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda g: -np.mean(g.seed_scores("overall") or [-1]))
    for g in order:
        cells = [g.label + (" (reference)" if g is reference else ""), str(len(g.runs))]
        for name, key, _ in cols:
            m, half, n = stats.mean_ci(g.seed_scores(name))
            cell = f"{m:.3f}" + (f" ± {half:.3f}" if n > 1 else "")
            r = results.get((g.label, key))
            if r is not None and r["q"] < stats.LEVEL:
                cell += f" **{'+' if r['diff'] > 0 else '−'}**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_groups(groups: list[Group], tasks: list[tuple[str, str]], out: Path) -> Path:
    """group_scores.png: per task and overall, each group's mean best dev score with its 95% CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [(f"{t}/{m}", f"{t} {m}") for t, m in tasks] + [("overall", "overall")]
    order = sorted(groups, key=lambda g: np.mean(g.seed_scores("overall") or [0.0]))
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 3, 0.32 * len(order) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (name, title) in zip(axes[0], cols):
        ms, hs = zip(*[stats.mean_ci(g.seed_scores(name))[:2] for g in order])
        ax.barh(range(len(order)), ms, xerr=[0 if np.isnan(h) else h for h in hs], color="tab:blue", capsize=2)
        lo, hi = min(m - (0 if np.isnan(h) else h) for m, h in zip(ms, hs)), max(m + (0 if np.isnan(h) else h)
                                                                               for m, h in zip(ms, hs))
        ax.set_xlim(max(0.0, lo - 0.1 * (hi - lo + 1e-3) - 0.01), hi + 0.1 * (hi - lo + 1e-3) + 0.005)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(order)), [f"{g.label} (n={len(g.runs)})" for g in order], fontsize=7)
    axes[0][0].set_ylabel("mean ± 95% CI")
    fig.tight_layout()
    path = out / "group_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reference_group(groups: list[Group], name: str) -> Group:
    """The group whose label (or method title) is ``name``; by default the summed loss's."""
    from mtbert.methods.registry import METHODS
    want = name or METHODS["sum"].title
    for g in groups:
        if g.label == want or g.key[0] == want:
            return g
    if name:
        raise ValueError(f"--reference: no group is {name!r}; groups: {', '.join(g.label for g in groups)}")
    return groups[0]


def report(runs: list[RunSummary], out: Path, reference: str = "", rounds: int = 2000) -> str:
    """The statistical table (written to out/stats.md) and group_scores.png."""
    groups, tasks = group_runs(runs), tasks_of(runs)
    ref = reference_group(groups, reference)
    results = compare_to(groups, ref, tasks, rounds)
    text = stats_table(groups, ref, results, tasks) + (
        f"\n\nmean ± 95% t-interval over seeds (n runs); **+/−**: differs from {ref.label!r} at 5% after "
        "Benjamini-Hochberg over every comparison of the table (seeds: Welch's t; examples: paired bootstrap "
        "of the dev predictions; both must agree — mtbert/report/stats.py); a group of one seed is not tested")
    (out / "stats.md").write_text(text + "\n")
    plot_groups(groups, tasks, out)
    return text
