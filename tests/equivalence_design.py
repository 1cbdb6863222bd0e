"""The equivalence matrix of the distributed tests: a covering design over the factors a
step depends on, in which every pair of factor levels that a valid configuration allows meets
in at least one case (greedy all-pairs construction; deterministic).

Each case runs N ranks with per-rank batch b as users launch (accelerate launch) and is
compared with 1 process on the global batch N b (tests/test_equivalence.py).
"""

from __future__ import annotations

import itertools

FACTORS: dict[str, tuple] = {
    "method": ("sum", "mean", "pcgrad", "gse", "smart", "pairwise", "arrp", "sequential"),
    "schedule": ("round_robin", "proportional", "annealed", "temperature", "union", "sequential"),
    "grad_accum": (2, 1),
    "reducer": ("sharded", "allreduce"),
    "engine": ("ddp", "zero1", "zero2", "zero3"),
    "precision": ("no", "bf16"),
    "ranks": (2, 3),
}

PER_TASK = {"pcgrad", "gse", "smart", "pairwise", "arrp"}
ZERO3_PER_TASK = {"pcgrad", "gse"}  # gradient surgery on ZeRO-3's partitions (engines/zero3.py)

# What each method level sets (SMART, pairwise and ARRP run with PCGrad: the per-task path).
METHOD_ARGS: dict[str, list[str]] = {
    "sum": ["--method.name=sum"],
    "mean": ["--method.name=mean"],
    "pcgrad": ["--method.name=pcgrad"],
    "gse": ["--method.name=gse"],
    "smart": ["--method.name=pcgrad", "--method.smart=true", "--method.smart_noise=1e-2"],
    "pairwise": ["--method.name=pcgrad", "--method.pairwise=true", "--train.epoch_steps=6"],
    "arrp": ["--method.name=pcgrad", "--method.arrp_batches=2", "--method.arrp_freeze=all_but_head"],
    "sequential": ["--method.name=sum"],
}

# Beyond the seeds (tests/test_aggregators.py checks each against its paper): every gradient
# method under DDP with both reducers, under ZeRO-2 and on ZeRO-3's partitions, every loss weighting under DDP and ZeRO-2
# (the summed path has no reducer); fp32, round-robin, grad_accum and rank counts rotated.
FAMILY_ARGS: dict[str, list[str]] = {
    "pcgrad_layer": ["--method.name=pcgrad", "--method.gram_blocks=layer"],
    "mgda": ["--method.name=mgda"],
    "cagrad": ["--method.name=cagrad"],
    "imtl_g": ["--method.name=imtl_g"],
    "aligned_mtl": ["--method.name=aligned_mtl"],
    "upgrad": ["--method.name=upgrad"],
    "dualproj": ["--method.name=dualproj"],
    "nash_mtl": ["--method.name=nash_mtl"],
    # a fast EMA and per-layer targets: later steps take GradVac's own branch (targets above 0)
    "gradvac": ["--method.name=gradvac", "--method.gradvac_beta=0.5", "--method.gram_blocks=layer"],
    "rlw": ["--method.name=rlw"],
    "uw": ["--method.name=uw"],
    "dwa": ["--method.name=dwa", "--method.dwa_window=1"],  # weights move from the third step
    "famo": ["--method.name=famo"],
}
LOSS_WEIGHTING = {"rlw", "uw", "dwa", "famo"}
# With the tiny random encoder the STS regression gradient is ~70x the others' in norm (Gram
# diagonal 1.2e4 vs 2-40); methods that rescale by gradient norms (CAGrad, MGDA, IMTL-G, ...)
# then amplify fp32 rounding of the reduction order (CAGrad: 7.5e-6 on the first step's norm,
# 1.5e-5 on the parameters). The STS loss weight brings the norms within ~3x of each other.
BALANCED = ["--heads.sts.weight=0.01"]
METHOD_ARGS.update({m: [*a, *BALANCED] for m, a in FAMILY_ARGS.items()})


def family_cases() -> list[dict]:
    cases = []
    for i, method in enumerate(FAMILY_ARGS):
        if method in LOSS_WEIGHTING:
            runs = [("allreduce", "ddp"), ("allreduce", "zero2")]
        else:  # ZeRO-3 reduces itself: its reducer setting is not used
            runs = [("allreduce", "ddp"), ("sharded", "ddp"), ("sharded" if i % 2 else "allreduce", "zero2"),
                    ("sharded", "zero3")]
        for j, (reducer, engine) in enumerate(runs):
            three = (reducer, engine) == ("sharded", "ddp") and i % 3 == 0 or engine == "zero3" and i % 3 == 1
            cases.append({"method": method, "schedule": "round_robin", "grad_accum": 1 + (i + j) % 2,
                          "reducer": reducer, "engine": engine, "precision": "no", "ranks": 3 if three else 2})
    return cases


ENGINE_CONFIG = {"ddp": "cpu_2proc.yaml", "zero1": "zero1.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


def valid(case: dict) -> bool:
    m, s = case["method"], case["schedule"]
    if m in ("pairwise", "arrp") and s != "round_robin":
        return False  # config refuses it (tests/test_equivalence.py checks the refusal)
    if (m == "sequential") != (s == "sequential"):
        return False
    if m not in PER_TASK and case["reducer"] != "allreduce":
        return False  # the summed path has no reducer
    if case["engine"] == "zero3" and (m in PER_TASK - ZERO3_PER_TASK or s != "round_robin"):
        return False  # refused (tests/test_distributed.py checks): SMART, phases / idle parameters
    return True


def _pairs(case: dict) -> set:
    items = sorted(case.items())
    return {(a, b) for a, b in itertools.combinations(items, 2)}


def covering_design() -> list[dict]:
    names = list(FACTORS)
    product = [dict(zip(names, values)) for values in itertools.product(*FACTORS.values())]
    candidates = [c for c in product if valid(c)]
    to_cover = set().union(*(_pairs(c) for c in candidates))
    cases = []
    while to_cover:
        best = max(candidates, key=lambda c: len(_pairs(c) & to_cover))
        cases.append(best)
        to_cover -= _pairs(best)
    return cases


def case_id(case: dict) -> str:
    return "-".join(str(case[k]) for k in FACTORS)
