"""The equivalence matrix of the distributed tests, as data: a covering design over every setting
a step depends on, in which every pair of levels of two factors that some configuration allows
meets in at least one case (a cost-weighted greedy all-pairs construction; deterministic).

Each case runs N ranks with per-rank batch b as users launch (accelerate launch) and is
compared with 1 process on the global batch N b (tests/test_equivalence.py). The cases of one
N run in one launch, in turn, each with its accelerate config's environment (tests/harness.py,
``launch_key``).

Which combinations are valid is decided by the rules in ``valid`` (cheap enough to enumerate the
whole product); ``tests/test_equivalence.py`` checks them against the code: every case of the
design passes the real config validation and refusals, and every pair the rules exclude is in
``EXCLUDED`` with its reason.
"""

from __future__ import annotations

import functools
import itertools
import random

from conftest import NO_DROPOUT

SUMMED = ("sum", "mean", "rlw", "uw", "dwa", "famo")  # one backward of combined losses
GRAM = ("pcgrad", "gse", "mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "nash_mtl", "gradvac")
FACTORS: dict[str, tuple] = {
    "method": ("sum", "mean", "pcgrad", "gse", "mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj",
               "nash_mtl", "gradvac", "rlw", "uw", "dwa", "famo"),
    "schedule": ("round_robin", "proportional", "annealed", "temperature", "union", "sequential"),
    "phases": ("none", "pairwise", "arrp"),  # the seeds' task pairs in turn; ARRP's extra largest-task batches
    "smart": ("off", "on"),
    "sharing": ("off", "on"),  # per-task top layer (model.sharing)
    "train_tasks": ("all", "two"),  # train sst and quora, evaluate all three
    "ema": ("off", "on"),  # the weight average (train.ema_decay)
    "blocks": ("whole", "layer"),  # one Gram per parameter block (method.gram_blocks)
    "grad_accum": (1, 2),
    "reducer": ("allreduce", "sharded"),
    "engine": ("ddp", "zero1", "zero2", "zero3", "fsdp2"),
    "precision": ("no", "bf16", "fp16"),
    "ranks": (2, 3),
}
DEFAULT = {f: levels[0] for f, levels in FACTORS.items()}

# With the tiny random encoder the STS regression gradient is ~70x the others' in norm (Gram
# diagonal 1.2e4 vs 2-40); methods that rescale by gradient norms (CAGrad, MGDA, IMTL-G, ...)
# then amplify fp32 rounding of the reduction order (CAGrad: 7.5e-6 on the first step's norm,
# 1.5e-5 on the parameters). The STS loss weight brings the norms within ~3x of each other.
BALANCED = ["--heads.sts.weight=0.01"]
METHOD_ARGS: dict[str, list[str]] = {m: [f"--method.name={m}"] for m in FACTORS["method"]}
for m in ("mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "nash_mtl", "gradvac", "rlw", "uw", "dwa",
          "famo"):
    METHOD_ARGS[m] += BALANCED
METHOD_ARGS["gradvac"] += ["--method.gradvac_beta=0.5"]  # a fast EMA: later steps take GradVac's own branch
METHOD_ARGS["dwa"] += ["--method.dwa_window=1"]  # weights move from the third step
LEVEL_ARGS: dict[tuple[str, object], list[str]] = {
    ("phases", "pairwise"): ["--method.pairwise=true", "--train.epoch_steps=6"],
    ("phases", "arrp"): ["--method.arrp_batches=2", "--method.arrp_freeze=all_but_head"],
    ("smart", "on"): ["--method.smart=true", "--method.smart_noise=1e-2"],
    ("sharing", "on"): ["--model.sharing=F0-S1-I1"],
    ("train_tasks", "two"): ["--train.train_tasks=sst,quora"],
    ("ema", "on"): ["--train.ema_decay=0.5"],
    ("blocks", "layer"): ["--method.gram_blocks=layer"],
    # fp16: a scale 8x below where the tiny model's gradients overflow (~2048-4096), so every step
    # applies; whether a step near that threshold overflows depends on how the batch is split over
    # ranks (docs/fp16.md), so skipped steps are proved apart, far above it (FP16_OVERFLOW below)
    ("precision", "fp16"): ["--train.fp16_loss_scale=256"],
}

# Pairs of levels no valid configuration holds, with the reason (checked against the code).
EXCLUDED: dict[tuple, str] = {
    (("phases", "pairwise"), ("schedule", s)): "pairs are trained round-robin (config)" for s in FACTORS["schedule"][1:]}
EXCLUDED.update({(("phases", "arrp"), ("schedule", s)): "ARRP extends round-robin (config)"
                 for s in FACTORS["schedule"][1:]})
EXCLUDED.update({(("method", m), ("reducer", "sharded")): "the summed path has no reducer" for m in SUMMED})
EXCLUDED.update({(("blocks", "layer"), ("method", m)): "block Grams are for per-task methods (config)" for m in SUMMED})
EXCLUDED[(("blocks", "layer"), ("method", "nash_mtl"))] = "Nash-MTL solves one bargaining problem per step (config)"
EXCLUDED[(("method", "famo"), ("smart", "on"))] = "FAMO re-evaluates the plain task losses (config)"


def valid(case: dict) -> bool:
    """Whether the code accepts the case, and whether its reducer level means something. Works on
    a partial case too (a rule applies once its factors are set); once the method is set, every
    rule left is between two factors, so a partial case that passes can always be completed."""
    get = case.get
    m, s = get("method"), get("schedule")
    if get("phases", "none") != "none" and s not in (None, "round_robin"):
        return False
    if m in SUMMED and get("reducer", "allreduce") != "allreduce":
        return False  # no reducer on the summed path: one level only
    if get("engine") in ("zero3", "fsdp2") and m in GRAM and get("reducer", "sharded") != "sharded":
        return False  # ZeRO-3 / FSDP2 reduce-scatter themselves: the setting is not used, one level only
    if get("blocks") == "layer" and (m in SUMMED or m == "nash_mtl"):
        return False
    if get("smart") == "on" and m == "famo":
        return False
    return True


def _pairs(case: dict) -> set:
    items = sorted((f, case[f]) for f in FACTORS if f in case)
    return set(itertools.combinations(items, 2))


def needed_pairs() -> set:
    """Every pair of levels of two factors, except the excluded ones."""
    out = set()
    for f, g in itertools.combinations(sorted(FACTORS), 2):
        out |= {((f, a), (g, b)) for a in FACTORS[f] for b in FACTORS[g]}
    return out - {tuple(sorted(p)) for p in EXCLUDED}


def cost(case: dict) -> float:
    """Rough seconds of a case inside a launch on 2 cores (2026-12-07): ZeRO-3 gathers parameters
    with ~1 ms gloo collectives, 3 ranks share 2 cores, bf16 has no native CPU kernels."""
    c = {"ddp": 0.6, "zero1": 0.8, "zero2": 0.8, "zero3": 2.5, "fsdp2": 1.0}[case["engine"]]
    c *= 1.8 if case["ranks"] == 3 else 1.0
    c *= 1.6 if case["precision"] != "no" else 1.0
    c *= 1.5 if case["smart"] == "on" else 1.0
    return c * (1.3 if case["grad_accum"] == 2 else 1.0)


@functools.lru_cache(maxsize=1)
def _design(tries: int = 60, seed: int = 0) -> tuple:
    """AETG-style greedy: around the first uncovered pair, ``tries`` random factor orders each
    fill the other factors one by one with the level that meets the most uncovered pairs (ties:
    the cheaper); the completed case with the most new pairs per second of cost is kept."""
    rng, to_cover, cases = random.Random(seed), needed_pairs(), []
    while to_cover:
        (f1, v1), (f2, v2) = target = min(to_cover)
        best, best_score = None, -1.0
        for _ in range(tries):
            case = {f1: v1, f2: v2}
            rest = [f for f in FACTORS if f not in case and f != "method"]
            rng.shuffle(rest)
            for f in ["method"] * ("method" not in case) + rest:  # every multi-factor rule involves the method
                def gain(level):
                    trial = {**case, f: level}
                    new = sum(tuple(sorted(((f, level), (g, trial[g])))) in to_cover for g in case)
                    return new, -cost({**DEFAULT, **trial})
                case[f] = max((lv for lv in FACTORS[f] if valid({**case, f: lv})), key=gain)
            score = len(_pairs(case) & to_cover) / cost(case)
            if score > best_score:
                best, best_score = case, score
        assert target in _pairs(best)
        cases.append({f: best[f] for f in FACTORS})
        to_cover -= _pairs(best)
    return tuple(cases)


def covering_design() -> list[dict]:
    return [dict(c) for c in _design()]


GLOBAL_BATCH = 12  # = 2 x 6 = 3 x 4: 2- and 3-rank cases share their 1-process reference
# Dropout is off (NO_DROPOUT): its masks are drawn per rank (the one documented exception to equality).
# STS with the bi-encoder regression head: the tiny random encoder maps every sentence to
# nearly the same vector, so the cosine head's gradient is ~1e-7 (cos saturates at 1). PCGrad
# projects onto the normal plane of such a near-zero g_j by dot / ||g_j||^2, and the dot's sign
# is then decided by rounding: the method itself is discontinuous there, on any engine.
# Test predictions are off: the matrix compares training, not the prediction files.
COMMON = [*NO_DROPOUT, "--train.epoch_steps=3", "--data.max_eval=8", "--train.eval_at_start=false",
          "--train.grad_clip=1.0", "--train.warmup=0",
          "--train.log_every=1", "--method.conflict_stats=false", "--heads.sts.kind=bi", "--train.predict_test=false"]


def case_args(case: dict) -> list[str]:
    """The trainer overrides of a case (without checkpoint, run directory and batch size)."""
    args = [*COMMON, *METHOD_ARGS[case["method"]], f"--train.schedule={case['schedule']}",
            f"--train.grad_accum={case['grad_accum']}", f"--method.reducer={case['reducer']}",
            f"--train.precision={case['precision']}"]
    for factor, level in case.items():
        args += LEVEL_ARGS.get((factor, level), [])
    if case["schedule"] == "annealed":
        args.append("--train.epochs=2")  # alpha changes with the epoch
    if "idle" in case:
        args.append(f"--train.idle_params={case['idle']}")
    return [*args, *case.get("args", ())]


def extra(**levels) -> dict:
    return {**DEFAULT, **levels}


# Settings outside the design's factors, each proved once: train.idle_params=step off DeepSpeed
# (a probabilistic schedule leaves undrawn heads without a gradient; they get zeros on every rank).
# Per-group learning rates (layer-wise decay, a head rate) through DeepSpeed's optimizer wrapper:
# each group keeps its own rate and schedule there as in torch.
EXTRA: list[dict] = [
    extra(method="pcgrad", schedule="proportional", grad_accum=2, idle="step"),
    extra(method="pcgrad", engine="zero2", args=("--train.layer_lr_decay=0.5", "--train.head_lr=3e-3")),
    extra(method="pcgrad", engine="zero3", reducer="sharded", args=("--train.layer_lr_decay=0.5",
                                                                     "--train.head_lr=3e-3")),
    # fp16's summed path under DeepSpeed goes through the ZeRO optimizer's external loss scale
    # (engines/zero.py): once per ZeRO stage (the design meets zero1/zero3 x fp16 with per-task methods)
    extra(method="sum", engine="zero1", precision="fp16", grad_accum=2),
    extra(method="mean", engine="zero3", precision="fp16", schedule="annealed")]
# fp16 far above the overflow threshold (2^18, 64x or more): steps 1-3 overflow on every rank and
# in one process alike, each skipped with the scale halved (2^18, 2^17, 2^16); summed and per-task
# paths, DDP (both reducers) and DeepSpeed's external loss scale (ZeRO-2, ZeRO-3).
FP16_OVERFLOW = ("--train.fp16_loss_scale=262144",)
EXTRA += [extra(method="sum", precision="fp16", args=FP16_OVERFLOW),
          extra(method="pcgrad", precision="fp16", reducer="sharded", ranks=3, args=FP16_OVERFLOW),
          extra(method="mean", precision="fp16", engine="zero2", grad_accum=2, args=FP16_OVERFLOW),
          extra(method="gse", precision="fp16", engine="zero3", reducer="sharded", args=FP16_OVERFLOW)]

# The methods added after the design was drawn (issue 25): each on the four reduction paths a
# per-task method can take -- DDP with the all-reduce and the sharded reducer, ZeRO-2 (DeepSpeed
# steps the combined gradient), ZeRO-3 (the update formed on each rank's partitions) -- ranks 2 and
# 3 in turn (so each method meets both counts and each path both); the coordinate-wise ones on
# FSDP2's shards too (their coordinates and per-coordinate state are the engines' own), the loss
# weightings on their three engines. The methods' logic is checked on Grams in tests/test_method_family.py; here what
# distribution can break: their state, the global losses (GradNorm), the per-coordinate draws.
NEW_GRAM = ("fairgrad", "config", "pcd", "sdmgrad", "modo", "cr_mogm", "gradnorm", "krum")
COLUMNS = ("trimmed_mean", "graddrop", "excess_mtl", "moco", "db_mtl")
NEW_SUMMED = ("gls", "stch")
PATHS = (("ddp", "allreduce"), ("ddp", "sharded"), ("zero2", "allreduce"), ("zero3", "sharded"))
for _m in (*NEW_GRAM, *COLUMNS, *NEW_SUMMED):
    METHOD_ARGS[_m] = [f"--method.name={_m}", *BALANCED]
METHOD_ARGS["stch"] += ["--method.stch_warmup=1"]  # the nadir from step 1: steps 2 and 3 are STCH's
METHOD_ARGS["gradnorm"] += ["--method.gradnorm_lr=0.1"]
METHOD_ARGS["krum"] += ["--method.krum_selected=2"]  # Multi-Krum: which two depends on the Gram
FAMILY: list[dict] = []
for _i, _m in enumerate((*NEW_GRAM, *COLUMNS)):
    _paths = PATHS + ((("fsdp2", "sharded"),) if _m in COLUMNS else ())
    FAMILY += [extra(method=_m, engine=e, reducer=r, ranks=2 + (_i + j) % 2) for j, (e, r) in enumerate(_paths)]
FAMILY += [extra(method=_m, engine=e, ranks=2 + (_i + j) % 2)
           for _i, _m in enumerate(NEW_SUMMED) for j, e in enumerate(("ddp", "zero2", "zero3"))]
EXTRA += FAMILY

# Set-ups refused before any work (the launch's config decides the engine): (engine, overrides,
# the field the message names). tests/test_distributed.py checks each in its launch group.
REFUSALS: list[dict] = [
    {"engine": "zero2", "ranks": 2, "args": ("--train.idle_params=keep",), "field": "train.idle_params"},
    # a method of issue 25 with a setting the matrix has not run it with (mtbert/distributed/accelerator.py)
    {"engine": "ddp", "ranks": 2, "args": ("--method.name=moco", "--train.grad_accum=2"), "field": "method.name"}]

# Faults injected into runs of the launch groups (tests/test_reliability.py checks them): NaN task
# losses on rank 0 only under ZeRO-2, once (steps skipped and counted) and from a step on (the run
# stops after train.max_bad_steps with its last good checkpoint), summed and per-task paths.
FAULTS: list[dict] = [
    {"name": f"nan-{when}-{method}", "engine": "zero2", "ranks": 2, "nan_calls": calls, "nan_ranks": "0",
     "args": (f"--method.name={method}", "--data.batch_size=4", *more)}
    for method in ("sum", "pcgrad")
    for when, calls, more in (("once", "7,8,9", ()), ("always", "13-", ("--train.epoch_steps=12",
                                                                         "--train.checkpoint_every=4",
                                                                         "--train.max_bad_steps=3")))]
# A preemption and resume inside a launch group: ZeRO-3 with the weight average (its partitions are
# gathered into the checkpoint and sliced back on resume), stopped by SIGUSR1 after step 2 of 6,
# resumed by the same command, against the same run uninterrupted (tests/test_weight_average.py).
def stopped_and_resumed(name: str, args: tuple) -> list[dict]:
    """The run whole, the same stopped after step 2 (SIGUSR1), and resumed by the same command."""
    base = {"engine": "zero3", "ranks": 2, "args": args}
    return [{**base, "name": f"{name}-whole"}, {**base, "name": f"{name}-stopped", "stop_at_step": 2},
            {**base, "name": f"{name}-resumed", "same_run": f"{name}-stopped"}]


# The same for a method's per-coordinate state (MoCo's tracked gradients, on each rank's ZeRO-3
# partitions, written per rank into the checkpoint): stopped after step 2 of 6 and resumed.
_MOCO_ZERO3 = ("--method.name=moco", "--heads.sts.weight=0.01", "--train.epoch_steps=6", "--train.log_every=1",
               "--model.dropout=0", "--train.checkpoint_every=3", "--data.batch_size=4")
FAULTS += stopped_and_resumed("moco-zero3", _MOCO_ZERO3)
_EMA_ZERO3 = ("--method.name=pcgrad", "--train.ema_decay=0.5", "--train.epoch_steps=6", "--train.log_every=1",
              "--model.dropout=0", "--train.checkpoint_every=3", "--data.batch_size=4")
FAULTS += stopped_and_resumed("ema-zero3", _EMA_ZERO3)

ENGINE_CONFIG = {"ddp": "cpu_2proc.yaml", "zero1": "zero1.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml",
                 "fsdp2": "fsdp2.yaml"}
SHORT = {"phases": None, "smart": "smart", "sharing": "sharing", "train_tasks": "tt", "ema": "ema", "blocks": "layer"}


def case_label(case: dict) -> str:
    """A unique, readable id: method, schedule, accumulation, reducer, engine, precision, ranks,
    then the options that are on and whatever the case sets besides the factors."""
    if "name" in case:
        return f"fault-{case['name']}"
    if "field" in case:
        return "refused-" + case["engine"] + "".join(f"-{a.split('.', 1)[-1]}" for a in case["args"])
    label = "-".join(str(case[k]) for k in ("method", "schedule", "grad_accum", "reducer", "engine", "precision",
                                            "ranks"))
    for factor, short in SHORT.items():
        if case[factor] != DEFAULT[factor]:
            label += f"-{short or case[factor]}"
    return (label + (f"-idle_{case['idle']}" if "idle" in case else "")
            + "".join(f"-{a.split('.', 1)[-1]}" for a in case.get("args", ())))


def equivalence_cases() -> list[dict]:
    """Every case of the matrix: the covering design and the extras."""
    return covering_design() + EXTRA


LAUNCH_CONFIG = "cpu_2proc.yaml"  # the launch of a group; each case runs its own config's environment


def launch_key(case: dict) -> int:
    """Cases that share a launch: the same number of processes. Each case runs with the variables
    ``accelerate launch`` sets for its own engine's config (harness.launch_env): one launch per
    world size instead of one per (config, world size) saves ~8 launch start-ups (docs/testing.md)."""
    return case["ranks"]
