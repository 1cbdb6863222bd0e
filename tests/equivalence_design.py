"""The equivalence matrix of the distributed tests: a covering design over the factors a
step depends on, in which every pair of factor levels that a valid configuration allows meets
in at least one case (greedy all-pairs construction; deterministic).

Each case runs N ranks with per-rank batch b as users launch (accelerate launch) and is
compared with 1 process on the global batch N b (tests/test_equivalence.py). The cases of one
(accelerate config, N) run in one launch, in turn (tests/harness.py): ``launch_groups``.
"""

from __future__ import annotations

import itertools

from conftest import NO_DROPOUT

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
ZERO3_PER_TASK = {"pcgrad", "gse", "pairwise", "arrp", "smart"}  # gradient surgery on ZeRO-3's partitions (engines/zero3.py)

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
            runs = [("allreduce", "ddp"), ("allreduce", "zero2"), ("allreduce", "zero3")]
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
    if case["engine"] == "zero3" and m in PER_TASK - ZERO3_PER_TASK:
        return False  # refused (tests/test_distributed.py checks): SMART with per-task methods
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


GLOBAL_BATCH = 12  # = 2 x 6 = 3 x 4: 2- and 3-rank cases share their 1-process reference
# Dropout is off (NO_DROPOUT): its masks are drawn per rank (the one documented exception to equality).
# STS with the bi-encoder regression head: the tiny random encoder maps every sentence to
# nearly the same vector, so the cosine head's gradient is ~1e-7 (cos saturates at 1). PCGrad
# projects onto the normal plane of such a near-zero g_j by dot / ||g_j||^2, and the dot's sign
# is then decided by rounding: the method itself is discontinuous there, on any engine.
# Test predictions are off: the matrix compares training, not the prediction files.
COMMON = [*NO_DROPOUT, "--train.epoch_steps=3", "--data.max_eval=8", "--train.grad_clip=1.0", "--train.warmup=0",
          "--train.log_every=1", "--method.conflict_stats=false", "--heads.sts.kind=bi", "--train.predict_test=false"]


def case_args(case: dict) -> list[str]:
    """The trainer overrides of a case (without checkpoint, run directory and batch size)."""
    args = [*COMMON, *METHOD_ARGS[case["method"]], f"--train.schedule={case['schedule']}",
            f"--train.grad_accum={case['grad_accum']}", f"--method.reducer={case['reducer']}",
            f"--train.precision={case['precision']}"]
    if case["schedule"] == "annealed":
        args.append("--train.epochs=2")  # alpha changes with the epoch
    if "idle" in case:
        args.append(f"--train.idle_params={case['idle']}")
    return [*args, *case.get("args", ())]


# Settings outside the design's factors, each proved once: train.idle_params=step off DeepSpeed
# (a probabilistic schedule leaves undrawn heads without a gradient; they get zeros on every rank).
# Per-group learning rates (layer-wise decay, a head rate) through DeepSpeed's optimizer wrapper:
# each group keeps its own rate and schedule there as in torch.
EXTRA: list[dict] = [
    {"method": "pcgrad", "schedule": "proportional", "grad_accum": 2, "reducer": "allreduce", "engine": "ddp",
     "precision": "no", "ranks": 2, "idle": "step"},
    {"method": "pcgrad", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero2",
     "precision": "no", "ranks": 2, "args": ("--train.layer_lr_decay=0.5", "--train.head_lr=3e-3")},
    {"method": "pcgrad", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero3",
     "precision": "no", "ranks": 2, "args": ("--train.layer_lr_decay=0.5", "--train.head_lr=3e-3")},
    # The weight average (train.ema_decay): final/ holds it, and ema_gap is compared at every step.
    {"method": "pcgrad", "schedule": "annealed", "grad_accum": 2, "reducer": "sharded", "engine": "ddp",
     "precision": "no", "ranks": 3, "args": ("--train.ema_decay=0.5",)},
    {"method": "sum", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero2",
     "precision": "no", "ranks": 2, "args": ("--train.ema_decay=0.5",)},
    {"method": "pcgrad", "schedule": "annealed", "grad_accum": 2, "reducer": "allreduce", "engine": "zero3",
     "precision": "no", "ranks": 2, "args": ("--model.sharing=F0-S1-I1",)},
    {"method": "sum", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero3",
     "precision": "no", "ranks": 2, "args": ("--model.sharing=F1-S0-I1",)},
    {"method": "smart", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero3",
     "precision": "no", "ranks": 2}]

# Set-ups refused before any work (the launch's config decides the engine): (engine, overrides,
# the field the message names). tests/test_distributed.py checks each in its launch group.
REFUSALS: list[dict] = [
    {"engine": "zero2", "ranks": 2, "args": ("--train.idle_params=keep",), "field": "train.idle_params"},
    {"engine": "ddp", "ranks": 2, "args": ("--method.name=mgda", "--train.schedule=union"), "field": "train.schedule"}]


def case_label(case: dict) -> str:
    """A unique, readable id: the factor levels, then whatever the case sets besides them."""
    if "field" in case:
        return "refused-" + case["engine"] + "".join(f"-{a.split('.', 1)[-1]}" for a in case["args"])
    return (case_id(case) + (f"-idle_{case['idle']}" if "idle" in case else "")
            + "".join(f"-{a.split('.', 1)[-1]}" for a in case.get("args", ())))


def equivalence_cases() -> list[dict]:
    """Every case of the matrix: the covering design, the extras, the method family."""
    return covering_design() + EXTRA + family_cases()


def launch_key(case: dict) -> tuple[str, int]:
    """Cases that share a launch: the same accelerate config and number of processes."""
    return ENGINE_CONFIG[case["engine"]], case["ranks"]
