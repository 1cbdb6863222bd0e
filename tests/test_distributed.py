"""Launch-level checks outside the equivalence matrix (tests/test_equivalence.py): refusals that
must happen before any work (run in the matrix's launch groups), and a check that the matrix's
comparisons have teeth (PCGrad differs from the summed loss by far more than the tolerance)."""


import pytest
from conftest import NO_DROPOUT, load_weights, read_metrics, rel_diff, run_main, tiny_args
from equivalence_design import LEVEL_ARGS, REFUSALS, case_label

pytestmark = pytest.mark.dist
STEPS = ["--train.epoch_steps=3", "--data.max_eval=16", "--train.grad_clip=1.0", "--train.warmup=0",
         "--train.log_every=1", "--train.grad_accum=2"]


def _norms(run):
    return [r["grad_norm"] for r in read_metrics(run) if r["split"] == "train"]


@pytest.mark.parametrize("case", REFUSALS, ids=case_label)
def test_unproved_set_ups_are_refused_before_any_work(launched, case):
    """Launched like the matrix's cases, in the same launch groups (the config decides the engine)."""
    result, run = launched(case)
    assert result.code == 2, f"{case_label(case)}: exit {result.code}\n{result.log[-3000:]}"
    assert f"config error: {case['field']}" in result.log, result.log[-3000:]
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("phases", ["pairwise", "arrp"])
def test_round_robin_only_methods_refuse_other_schedules(tiny_ckpt, tmp_path, phases):
    args = tiny_args(tiny_ckpt, tmp_path / "run", "--method.name=pcgrad", *LEVEL_ARGS[("phases", phases)],
                     "--train.schedule=union")
    assert run_main(args) == 2


def test_pcgrad_differs_from_sum_so_the_proofs_have_teeth(tiny_ckpt, tmp_path):
    runs = {}
    for method in ("sum", "pcgrad"):
        runs[method] = tmp_path / method
        assert run_main(tiny_args(tiny_ckpt, runs[method], *NO_DROPOUT, *STEPS, f"--method.name={method}",
                                  "--data.batch_size=8")) == 0
    assert rel_diff(load_weights(runs["pcgrad"] / "final"), load_weights(runs["sum"] / "final")) > 1000 * 1e-6
    assert max(abs(a / b - 1) for a, b in zip(_norms(runs["pcgrad"]), _norms(runs["sum"]))) > 1000 * 1e-5


def test_deepspeed_set_ups_that_bypass_what_mtbert_reads_are_refused():
    """Refusals that depend on the DeepSpeed config (not on a launch): ZeRO-3 optimizer offload
    with per-task methods or idle parameters (it bypasses the gradient partitions mtbert reads and
    clears), and DeepSpeed's own fp16 engine (mtbert runs fp16 itself: it would scale twice)."""
    from mtbert.config.cli import parse_args
    from mtbert.distributed.accelerator import _refuse_deepspeed_fp16, _refuse_unproved_zero3
    from mtbert.errors import ConfigError
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    for args in (["--method.name=pcgrad"], ["--train.schedule=annealed"]):
        with pytest.raises(ConfigError, match="zero_optimization.offload_optimizer"):
            _refuse_unproved_zero3(parse_args(args), offload)
        _refuse_unproved_zero3(parse_args(args), {})
    _refuse_unproved_zero3(parse_args(["--method.name=sum"]), offload)  # every parameter used every step
    with pytest.raises(ConfigError, match="train.precision=fp16"):
        _refuse_deepspeed_fp16({"fp16": {"enabled": True}})
    _refuse_deepspeed_fp16({"fp16": {"enabled": "auto"}})
