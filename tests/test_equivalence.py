"""The equivalence matrix: N ranks with per-rank batch b train exactly what 1 process trains
on the global batch N b — final parameters *and*, at every step, the pre-clip norm of the
combined gradient and the learning rate (AdamW parameters alone hide a uniform factor such
as a gradient divided twice by the world size or by the accumulation count).

Cases: tests/equivalence_design.py (every pair of factor levels meets at least once).
References: 1 process, in this process, on the global batch (12 = 2 x 6 = 3 x 4, so 2- and
3-rank cases share them). DeepSpeed steps every parameter (train.idle_params=step), so its
fp32 reference runs with that setting; under bf16 DeepSpeed holds bf16 parameters itself, so
its reference is the same DeepSpeed config launched with 1 process.
Dropout is off: its masks are drawn per rank (the one documented exception to equality).
"""

from __future__ import annotations

import json

import pytest
from conftest import NO_DROPOUT, launch, load_weights, read_metrics, rel_diff, run_main, tiny_args, worst_tensor
from equivalence_design import (ENGINE_CONFIG, FACTORS, METHOD_ARGS, _pairs, case_id, covering_design, family_cases,
                                valid)

pytestmark = pytest.mark.dist
GLOBAL_BATCH = 12
# STS with the bi-encoder regression head: the tiny random encoder maps every sentence to
# nearly the same vector, so the cosine head's gradient is ~1e-7 (cos saturates at 1). PCGrad
# projects onto the normal plane of such a near-zero g_j by dot / ||g_j||^2, and the dot's sign
# is then decided by rounding: the method itself is discontinuous there, on any engine.
COMMON = [*NO_DROPOUT, "--train.epoch_steps=3", "--data.max_eval=8", "--train.grad_clip=1.0", "--train.warmup=0",
          "--train.log_every=1", "--method.conflict_stats=false", "--heads.sts.kind=bi"]
# Settings outside the design's factors, each proved once: train.idle_params=step off DeepSpeed
# (a probabilistic schedule leaves undrawn heads without a gradient; they get zeros on every rank).
# Per-group learning rates (layer-wise decay, a head rate) through DeepSpeed's optimizer wrapper:
# each group keeps its own rate and schedule there as in torch.
EXTRA = [{"method": "pcgrad", "schedule": "proportional", "grad_accum": 2, "reducer": "allreduce", "engine": "ddp",
          "precision": "no", "ranks": 2, "idle": "step"},
         {"method": "pcgrad", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero2",
          "precision": "no", "ranks": 2, "args": ("--train.layer_lr_decay=0.5", "--train.head_lr=3e-3")},
         {"method": "pcgrad", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero3",
          "precision": "no", "ranks": 2, "args": ("--train.layer_lr_decay=0.5", "--train.head_lr=3e-3")},
         # The weight average (train.ema_decay): final/ holds it, and ema_gap is compared at every step.
         {"method": "pcgrad", "schedule": "annealed", "grad_accum": 2, "reducer": "sharded", "engine": "ddp",
          "precision": "no", "ranks": 3, "args": ("--train.ema_decay=0.5",)},
         {"method": "sum", "schedule": "round_robin", "grad_accum": 1, "reducer": "allreduce", "engine": "zero2",
          "precision": "no", "ranks": 2, "args": ("--train.ema_decay=0.5",)}]
CASES = covering_design()
FAMILY = family_cases()  # the multi-task gradient and loss-weighting methods (issue: method family)
# fp32: reduction order only. bf16: the batch shape changes which rows share a GEMM tile, and
# bf16 rounding of activations turns that into ~1e-3 differences (ZeRO also averages bf16
# gradients in bf16: ~1e-2 on a norm); a factor of 2 still fails.
TOL = {("no", "ddp"): (1e-6, 1e-5), ("no", "zero"): (1e-5, 1e-5), ("bf16", "ddp"): (2e-3, 1e-2),
       ("bf16", "zero"): (5e-3, 3e-2)}
# Per tensor (||diff_k|| / ||ref_k||), fp32 only: one wrong tensor moves by its update (~lr x steps x
# sqrt(n)), >= 1e-2 of its norm here; measured worst over the matrix 1.2e-5, and 1.1e-4 (a qkv bias) in a
# CI rehearsal under load (2026-11-22). Under bf16 the small-norm LayerNorm biases carry rounding of
# their own size (up to 0.26): the checks above stand.
TENSOR_TOL = {"no": 1e-3}


def case_args(case: dict) -> list[str]:
    args = [*COMMON, *METHOD_ARGS[case["method"]], f"--train.schedule={case['schedule']}",
            f"--train.grad_accum={case['grad_accum']}", f"--method.reducer={case['reducer']}",
            f"--train.precision={case['precision']}"]
    if case["schedule"] == "annealed":
        args.append("--train.epochs=2")  # alpha changes with the epoch
    if "idle" in case:
        args.append(f"--train.idle_params={case['idle']}")
    return [*args, *case.get("args", ())]


def reference_key(case: dict) -> tuple:
    deepspeed = case["engine"] != "ddp"
    return (case["method"], case["schedule"], case["grad_accum"], case["precision"], *case.get("args", ()),
            case["engine"] if deepspeed and case["precision"] == "bf16"
            else case.get("idle", "step" if deepspeed else "keep"))


@pytest.fixture(scope="module")
def references(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("references")
    cache = {}

    def get(case: dict):
        key = reference_key(case)
        if key not in cache:
            run = root / "-".join(map(str, key))
            args = tiny_args(tiny_ckpt, run, *case_args(case), f"--data.batch_size={GLOBAL_BATCH}")
            if key[-1] in ENGINE_CONFIG:  # DeepSpeed bf16: the same engine in 1 process
                result = launch(ENGINE_CONFIG[key[-1]], args, processes=1)
                assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
            else:
                assert run_main([*args, f"--train.idle_params={key[-1]}"]) == 0
            cache[key] = run
        return cache[key]
    return get


def per_step(run) -> list[dict]:
    keep = ("step", "grad_norm", "lr", "skipped", "ema_gap")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("loss/")}
            for r in read_metrics(run) if r["split"] == "train"]


def assert_same_steps(got: list[dict], ref: list[dict], tol: float, label: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref], f"{label}: different steps"
    for g, r in zip(got, ref):
        assert g["skipped"] == r["skipped"] == 0, f"{label} step {g['step']}: skipped"
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-9), f"{label} step {g['step']}: lr {g['lr']} vs {r['lr']}"
        losses = sorted(k for k in r if k.startswith("loss/"))
        assert sorted(k for k in g if k.startswith("loss/")) == losses, f"{label} step {g['step']}: other tasks"
        # The global batch's task losses (ranks' share-weighted losses, averaged), compared as one
        # vector: a near-zero loss of one task (bf16: 0.0018 vs 0.0017) carries no relative precision.
        diff = sum((g[k] - r[k]) ** 2 for k in losses) ** 0.5 / max(sum(r[k] ** 2 for k in losses) ** 0.5, 1e-12)
        assert diff <= tol, f"{label} step {g['step']}: task losses {[g[k] for k in losses]} vs {[r[k] for k in losses]}"
        assert ("ema_gap" in g) == ("ema_gap" in r), f"{label} step {g['step']}: a weight average on one side only"
        if "ema_gap" in r:  # ||raw - average||: an average updated twice, or from other weights, moves it
            assert abs(g["ema_gap"] / r["ema_gap"] - 1) <= tol, (f"{label} step {g['step']}: ema_gap "
                                                                 f"{g['ema_gap']:.6g} vs 1 process {r['ema_gap']:.6g}")
        ratio = g["grad_norm"] / r["grad_norm"]
        assert abs(ratio - 1) <= tol, (f"{label} step {g['step']}: gradient norm {g['grad_norm']:.6g} vs "
                                       f"1 process {r['grad_norm']:.6g} (ratio {ratio:.6f})")


def test_the_design_covers_every_pair_of_levels():
    product = [dict(zip(FACTORS, v)) for v in __import__("itertools").product(*FACTORS.values())]
    needed = set().union(*(_pairs(c) for c in product if valid(c)))
    covered = set().union(*(_pairs(c) for c in CASES))
    assert needed <= covered and all(valid(c) for c in CASES)
    assert len(CASES) <= 40, "keep the matrix inside CI's budget"


@pytest.mark.parametrize("case", CASES + EXTRA + FAMILY, ids=lambda c: case_id(c) + (f"-idle_{c['idle']}" if "idle" in c else "")
                         + "".join(f"-{a.split('.', 1)[-1]}" for a in c.get("args", ())))
def test_n_ranks_equal_one_process_on_the_global_batch(tiny_ckpt, tmp_path, references, case):
    ranks, label = case["ranks"], case_id(case)
    ref = references(case)
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *case_args(case), f"--data.batch_size={GLOBAL_BATCH // ranks}")
    result = launch(ENGINE_CONFIG[case["engine"]], args, processes=ranks)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"{ranks} process(es)" in log, "the launch did not start the ranks of one job"
    summary = json.loads((run / "summary.json").read_text())
    sharded = case["engine"] == "zero3"  # each rank holds a shard: no replica check (final weights gathered)
    assert summary["processes"] == ranks and summary["params_agree_across_ranks"] is (None if sharded else True)
    p_tol, n_tol = TOL[(case["precision"], "ddp" if case["engine"] == "ddp" else "zero")]
    assert_same_steps(per_step(run), per_step(ref), n_tol, label)
    got, want = load_weights(run / "final"), load_weights(ref / "final")
    diff = rel_diff(got, want)
    assert diff <= p_tol, f"{label}: relative parameter difference {diff:.2e}"
    if case["precision"] in TENSOR_TOL:
        worst, name = worst_tensor(got, want)
        assert worst <= TENSOR_TOL[case["precision"]], f"{label}: {name} differs by {worst:.2e} of its norm"


@pytest.mark.parametrize("method", ["pairwise", "arrp"])
def test_round_robin_only_methods_refuse_other_schedules(tiny_ckpt, tmp_path, method):
    args = tiny_args(tiny_ckpt, tmp_path / "run", *METHOD_ARGS[method], "--train.schedule=union")
    assert run_main(args) == 2
