"""Statistics for method comparisons (``python -m mtbert.compare``): seed groups, t confidence
intervals, a two-level significance test on the saved dev predictions, and a multiple-comparison
correction.

Why two levels. A method's dev score varies with the training seed *and* with the dev examples.
A paired test over examples alone (the usual paired bootstrap) calls two seeds of the *same*
method "significantly different" whenever their models differ, which they always do; a test over
seeds alone ignores that the dev set is a sample. So a difference is tested twice and must pass
both (the p-value is the larger one, which keeps the false-positive rate at or below the level,
as tests/test_stats.py checks on synthetic runs):
- **seeds**: Welch's t-test on the per-seed dev scores of the two groups (scipy), which needs at
  least 2 seeds per group (with 1 the seed level is not tested, and the table says so);
- **examples**: a paired bootstrap over the dev examples (the same resampled examples for both
  groups) of the seed-averaged scores: per example, the fraction of seeds correct (accuracy) or
  the seed-averaged prediction (Pearson).
Then the Benjamini-Hochberg correction over every comparison in the table
(``scipy.stats.false_discovery_control``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.05


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """-> (mean, half-width of the t confidence interval, n); half-width nan for n < 2."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return float(x.mean()) if n else float("nan"), float("nan"), n
    half = sps.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
    return float(x.mean()), float(half), n


def score(kind: str, preds: np.ndarray, gold: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Dev metric of predictions [..., N] against gold [N]: accuracy (``acc``) or Pearson
    (``pearson``); ``weights`` [R, N] (bootstrap counts) give one value per row -> [..., R]."""
    if weights is None:
        weights = np.ones((1, preds.shape[-1]))
    w = weights / weights.sum(-1, keepdims=True)  # [R, N]
    if kind == "acc":
        return (preds == gold).astype(float) @ w.T
    x, y = preds.astype(float), gold.astype(float)
    mx, my = x @ w.T, w @ y  # [..., R], [R]
    cov = (x * y) @ w.T - mx * my
    vx, vy = (x * x) @ w.T - mx ** 2, w @ (y * y) - my ** 2
    return cov / np.sqrt(np.clip(vx * vy, 1e-30, None))


@dataclass
class TaskPredictions:
    """One group's dev predictions of one task: [seeds, N] aligned with gold [N]."""

    kind: str  # "acc" or "pearson"
    preds: np.ndarray
    gold: np.ndarray

    def seed_scores(self) -> np.ndarray:
        return score(self.kind, self.preds, self.gold)[:, 0]

    def example_view(self) -> np.ndarray:
        """Seed-averaged per-example values: fraction of seeds correct, or the mean prediction."""
        if self.kind == "acc":
            return (self.preds == self.gold).mean(0)
        return self.preds.astype(float).mean(0)


def _example_scores(tp: TaskPredictions, weights: np.ndarray) -> np.ndarray:
    v = tp.example_view()
    if tp.kind == "acc":
        return (weights / weights.sum(-1, keepdims=True)) @ v
    return score("pearson", v, tp.gold, weights)


def compare_groups(a: dict[str, TaskPredictions], b: dict[str, TaskPredictions], rounds: int = 2000,
                   seed: int = 0) -> dict[str, dict]:
    """Group a vs group b on the tasks they share, and ``overall`` (the mean of the task scores).
    -> key -> {diff (a - b, mean of per-seed scores), p_seeds, p_examples, p}."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in a if t in b and np.array_equal(a[t].gold, b[t].gold)]
    out, boot = {}, {}
    for t in tasks:
        n = len(a[t].gold)
        weights = rng.multinomial(n, np.full(n, 1 / n), size=rounds).astype(float)  # [R, N]: the same for both
        boot[t] = _example_scores(a[t], weights) - _example_scores(b[t], weights)
        out[t] = _test(a[t].seed_scores(), b[t].seed_scores(), boot[t], _example_scores(a[t], np.ones((1, n)))[0]
                       - _example_scores(b[t], np.ones((1, n)))[0])
    if len(tasks) > 1:
        sa = np.mean([a[t].seed_scores() for t in tasks], 0) if _same_seeds(a, tasks) else None
        sb = np.mean([b[t].seed_scores() for t in tasks], 0) if _same_seeds(b, tasks) else None
        if sa is not None and sb is not None:
            out["overall"] = _test(sa, sb, np.mean([boot[t] for t in tasks], 0),
                                   float(np.mean([out[t]["example_diff"] for t in tasks])))
    return out


def _same_seeds(group: dict[str, TaskPredictions], tasks: list[str]) -> bool:
    return len({group[t].preds.shape[0] for t in tasks}) == 1


def _test(seeds_a: np.ndarray, seeds_b: np.ndarray, boot: np.ndarray, example_diff: float) -> dict:
    diff = float(seeds_a.mean() - seeds_b.mean())
    p_examples = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
    if len(seeds_a) >= 2 and len(seeds_b) >= 2:
        p_seeds = float(sps.ttest_ind(seeds_a, seeds_b, equal_var=False).pvalue)
        p_seeds = 1.0 if np.isnan(p_seeds) else p_seeds  # identical scores: no evidence of a difference
    else:
        p_seeds = float("nan")  # one seed: the seed level cannot be tested
    # With one seed only the examples could speak, and they ignore the seed's own variance: that test's
    # false-positive rate was measured at 0.17 for a nominal 0.05 (tests/test_stats.py), so no p at all.
    p = max(p_seeds, p_examples) if not np.isnan(p_seeds) else float("nan")
    return {"diff": diff, "example_diff": example_diff, "p_seeds": p_seeds, "p_examples": p_examples, "p": p}


def seed_test(seeds_a: np.ndarray, seeds_b: np.ndarray) -> dict | None:
    """The seed level alone (no prediction files): Welch's t on the per-seed scores; None with
    fewer than 2 seeds in a group (nothing can be said)."""
    if len(seeds_a) < 2 or len(seeds_b) < 2:
        return None
    r = _test(seeds_a, seeds_b, np.array([1.0]), float("nan"))
    r["p_examples"], r["p"] = float("nan"), r["p_seeds"]
    return r


def adjust(pvalues: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (the false discovery rate over the table's comparisons)."""
    if not pvalues:
        return []
    return [float(q) for q in sps.false_discovery_control(np.asarray(pvalues, dtype=float), method="bh")]
