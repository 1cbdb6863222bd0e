"""mtbert/report/stats.py on synthetic runs whose true difference is known: the false-positive rate of
the comparison test is measured (not assumed) where there is no difference, and its power where
there is one. The synthetic models have a seed effect (each seed's model is a little better or
worse) and shared per-example difficulty, as fine-tuned models do."""

import numpy as np
import pytest

from mtbert.report.stats import TaskPredictions, adjust, compare_groups, mean_ci

N, SEEDS, SIMS = 400, 3, 200


def _acc_group(rng, gold, difficulty, quality, seeds=SEEDS, seed_sd=0.03):
    preds = []
    for _ in range(seeds):
        q = quality + seed_sd * rng.standard_normal()
        p = 1 / (1 + np.exp(-(np.log(q / (1 - q)) + difficulty)))
        right = rng.random(len(gold)) < p
        wrong = (gold + rng.integers(1, 5, len(gold))) % 5
        preds.append(np.where(right, gold, wrong))
    return TaskPredictions("acc", np.stack(preds), gold)


def _sts_group(rng, gold, noise, seeds=SEEDS, seed_sd=0.1):
    preds = [gold * (1 + 0.1 * rng.standard_normal()) + (noise + seed_sd * abs(rng.standard_normal()))
             * rng.standard_normal(len(gold)) for _ in range(seeds)]
    return TaskPredictions("pearson", np.stack(preds), gold)


def _world(rng):
    gold_cls, gold_sts = rng.integers(0, 5, N), rng.uniform(0, 5, N)
    return gold_cls, rng.standard_normal(N), gold_sts


def _rates(delta_acc, delta_noise, sims=SIMS):
    rng = np.random.default_rng(1)
    hits = {"p": 0, "p_examples": 0}
    for i in range(sims):
        gold, diff, sts = _world(rng)
        a = {"sst": _acc_group(rng, gold, diff, 0.5 + delta_acc), "sts": _sts_group(rng, sts, 1.0 - delta_noise)}
        b = {"sst": _acc_group(rng, gold, diff, 0.5), "sts": _sts_group(rng, sts, 1.0)}
        res = compare_groups(a, b, rounds=400, seed=i)
        for k in hits:
            hits[k] += res["sst"][k] < 0.05
    return {k: v / sims for k, v in hits.items()}


def test_no_true_difference_is_called_significant_at_most_at_the_level():
    rates = _rates(0.0, 0.0)
    assert rates["p"] <= 0.08, rates  # binomial sd at 200 sims: 0.015
    # the example-level test alone mistakes the seed effect for a difference: why both levels are tested
    assert rates["p_examples"] >= 0.1, rates  # measured 0.17 (and 0.01 for the two-level p)


def test_a_true_difference_is_found():
    # 3 seeds: Welch's t on 3 vs 3 values limits the power (measured 0.66 at +0.12, 0.9+ at +0.2)
    assert _rates(0.2, 0.0)["p"] >= 0.8


def test_overall_and_pearson_and_one_seed():
    rng = np.random.default_rng(3)
    gold, diff, sts = _world(rng)
    a = {"sst": _acc_group(rng, gold, diff, 0.75), "sts": _sts_group(rng, sts, 0.3)}
    b = {"sst": _acc_group(rng, gold, diff, 0.5), "sts": _sts_group(rng, sts, 2.0)}
    res = compare_groups(a, b, rounds=400)
    assert set(res) == {"sst", "sts", "overall"}
    assert all(res[k]["diff"] > 0 and res[k]["p"] < 0.05 for k in res), res
    one = compare_groups({"sst": _acc_group(rng, gold, diff, 0.6, seeds=1)},
                         {"sst": _acc_group(rng, gold, diff, 0.5, seeds=1)}, rounds=400)
    # one seed: the examples alone would speak (FPR 0.17 above), so there is no p and no mark
    assert np.isnan(one["sst"]["p_seeds"]) and np.isnan(one["sst"]["p"]) and one["sst"]["p_examples"] < 0.05


def test_confidence_interval_and_correction():
    m, half, n = mean_ci([0.5, 0.6, 0.7])
    assert n == 3 and m == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    assert np.isnan(mean_ci([0.5])[1])
    q = adjust([0.01, 0.04, 0.03, 0.5])
    assert q == pytest.approx([0.04, 0.0533333, 0.0533333, 0.5], rel=1e-5)
