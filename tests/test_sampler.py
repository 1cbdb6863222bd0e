"""Task schedules' statistics and the sharded sampler's guarantees (no processes needed)."""

from collections import Counter

import pytest

from mtbert.data.sampler import ShardedTaskSampler, TaskStream, annealed_alpha, plan_step, task_probs

SIZES = {"sst": 8544, "quora": 16000, "sts": 6040}


def test_round_robin_every_task_every_step():
    for step in range(20):
        assert plan_step("round_robin", 0, step, SIZES, 32) == {k: 32 for k in SIZES}


@pytest.mark.parametrize("kind,power", [("proportional", 1.0), ("temperature", 0.5)])
def test_probabilistic_schedules_match_their_probabilities(kind, power):
    n = 6000
    counts = Counter(next(iter(plan_step(kind, 1, s, SIZES, 32, temperature=2.0))) for s in range(n))
    total = sum(v ** power for v in SIZES.values())
    for task, size in SIZES.items():
        p = size ** power / total
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(counts[task] / n - p) < 5 * sd, (task, counts[task] / n, p)


def test_annealed_alpha_and_probs():
    assert annealed_alpha(1, 1) == 1.0  # guard E = 1
    assert annealed_alpha(1, 5) == 1.0 and annealed_alpha(5, 5) == pytest.approx(0.2)
    first, last = task_probs("annealed", SIZES, 1, 5), task_probs("annealed", SIZES, 5, 5)
    assert first == pytest.approx(task_probs("proportional", SIZES))
    assert last["sts"] > first["sts"] and last["quora"] < first["quora"]  # flatter later


def test_union_counts_sum_to_batch_and_follow_sizes():
    totals = Counter()
    for s in range(2000):
        plan = plan_step("union", 3, s, SIZES, 32)
        assert sum(plan.values()) == 32 and all(v > 0 for v in plan.values())
        totals.update(plan)
    share = {k: totals[k] / (2000 * 32) for k in SIZES}
    for k, n in SIZES.items():
        assert share[k] == pytest.approx(n / sum(SIZES.values()), abs=0.01)


def test_schedule_identical_across_ranks_and_runs():
    for kind in ("proportional", "annealed", "temperature", "union"):
        a = [plan_step(kind, 7, s, SIZES, 16, 2, 3) for s in range(50)]
        b = [plan_step(kind, 7, s, SIZES, 16, 2, 3) for s in range(50)]
        assert a == b


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("bucket", [False, True])
def test_shards_partition_each_epoch(world, bucket):
    n, batch = 203, 4
    lengths = [(i * 37) % 50 + 1 for i in range(n)]
    streams = [TaskStream(0, lengths, 5, world, r, batch, bucket) for r in range(world)]
    per_epoch = n // (batch * world)
    for epoch in range(2):
        seen = [sum((s.take(batch) for _ in range(per_epoch)), []) for s in streams]
        flat = [i for part in seen for i in part]
        assert len(flat) == len(set(flat)), "shards overlap"
        assert len({len(p) for p in seen}) == 1, "shards must be even"
        # union = the epoch's order minus the dropped tail shorter than one global batch
        assert set(flat) == set(streams[0].order(epoch)[:per_epoch * batch * world])
        assert n - len(flat) < batch * world
    assert streams[0].order(0) != streams[0].order(1), "epochs reshuffle"


def test_one_process_sees_the_union_of_the_ranks_batches():
    lengths = [5] * 64
    ranks = [TaskStream(0, lengths, 1, 2, r, 4, True) for r in range(2)]
    single = TaskStream(0, lengths, 1, 1, 0, 8, True)
    for _ in range(12):
        assert single.take(8) == ranks[0].take(4) + ranks[1].take(4)


def test_bucketing_reduces_padding():
    import random
    rnd = random.Random(0)
    lengths = [rnd.randint(5, 60) for _ in range(4000)]

    def waste(bucket):
        s = TaskStream(0, lengths, 0, 1, 0, 32, bucket)
        pad = real = 0
        for _ in range(len(lengths) // 32):
            b = [lengths[i] for i in s.take(32)]
            pad += max(b) * len(b)
            real += sum(b)
        return 1 - real / pad
    assert waste(True) < 0.10 < waste(False)


def test_resume_mid_epoch_repeats_and_loses_nothing():
    lengths = list(range(1, 101))
    full = ShardedTaskSampler({"a": lengths, "b": lengths[:60]}, 3, 2, 1, 5, True)
    ref = [full.next({"a": 10, "b": 10}) for _ in range(30)]
    part = ShardedTaskSampler({"a": lengths, "b": lengths[:60]}, 3, 2, 1, 5, True)
    got = [part.next({"a": 10, "b": 10}) for _ in range(13)]
    state = part.state_dict()
    resumed = ShardedTaskSampler({"a": lengths, "b": lengths[:60]}, 3, 2, 1, 5, True)
    resumed.load_state_dict(state)
    got += [resumed.next({"a": 10, "b": 10}) for _ in range(17)]
    assert got == ref


@pytest.mark.parametrize("kind", ["round_robin", "proportional", "union"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_schedule_gives_one_process_the_union_of_the_ranks_examples(kind, world):
    """The plan counts the global batch, so it does not depend on the world size; the ranks'
    slices of each task are disjoint and together are exactly what 1 process takes — also
    for the union schedule, where a rank may hold a task partly or not at all (issue: union
    drew task counts per rank from the per-rank batch)."""
    from mtbert.data.sampler import ShardedTaskSampler
    lengths = {"a": [3] * 90, "b": [4] * 70, "c": [5] * 50}
    b = 4
    single = ShardedTaskSampler(lengths, 5, 1, 0, b * world, False)
    ranks = [ShardedTaskSampler(lengths, 5, world, r, b, False) for r in range(world)]
    sizes = {t: len(v) for t, v in lengths.items()}
    uneven = 0
    for step in range(40):
        plan = plan_step(kind, 9, step, sizes, b * world)
        assert plan == plan_step(kind, 9, step, sizes, b * world)  # same on every rank
        want = single.next(plan, union=kind == "union")
        got = [r.next(plan, union=kind == "union") for r in ranks]
        for t in plan:
            parts = [g[t] for g in got]
            assert sum(parts, []) == want[t]
            uneven += len({len(p) for p in parts}) > 1
        assert all(sum(len(i) for i in g.values()) == (b if kind == "union" else b * len(plan)) for g in got)
    assert (uneven > 0) == (kind == "union")


def test_rank_shares_make_the_mean_of_rank_means_the_global_mean():
    """share = n_local * world / n_global: the ranks' share-weighted mean losses, averaged over
    ranks (what the reducers and DDP do), equal the mean over the global batch."""
    import torch

    from mtbert.data.sampler import rank_slices
    plan, world = {"a": 5, "b": 1, "c": 6}, 3
    values = {t: torch.randn(n, dtype=torch.float64) for t, n in plan.items()}
    for t, n in plan.items():
        total = 0.0
        for r in range(world):
            lo, hi = rank_slices(plan, world, r, True)[t]
            if hi > lo:
                total += values[t][lo:hi].mean() * ((hi - lo) * world / n)
        assert float(total / world) == pytest.approx(float(values[t].mean()), rel=1e-12)
