"""Launch-level checks outside the equivalence matrix (tests/test_equivalence.py): refusals that
must happen before any work, and a check that the matrix's comparisons have teeth (PCGrad
differs from the summed loss by far more than the tolerance)."""


import pytest
from conftest import NO_DROPOUT, launch, load_weights, read_metrics, rel_diff, run_main, tiny_args

pytestmark = pytest.mark.dist
STEPS = ["--train.epoch_steps=3", "--data.max_eval=16", "--train.grad_clip=1.0", "--train.warmup=0",
         "--train.log_every=1", "--train.grad_accum=2"]


def _norms(run):
    return [r["grad_norm"] for r in read_metrics(run) if r["split"] == "train"]


def test_deepspeed_refuses_unproved_set_ups_before_any_work(tiny_ckpt, tmp_path):
    for config, extra, field in (("zero2.yaml", ["--train.idle_params=keep"], "train.idle_params"),
                                 ("zero3.yaml", ["--method.name=pcgrad", "--method.smart=true"], "method.smart"),
                                 ("zero3.yaml", ["--train.schedule=proportional"], "train.schedule"),
                                 ("zero3.yaml", ["--method.name=famo"], "method.name"),
                                 ("cpu_2proc.yaml", ["--method.name=mgda", "--train.schedule=union"], "train.schedule")):
        run = tmp_path / config
        result = launch(config, tiny_args(tiny_ckpt, run, *extra))
        assert result.returncode != 0
        assert f"config error: {field}" in result.stderr, result.stderr[-3000:]
        assert not (run / "metrics.jsonl").exists()


def test_pcgrad_differs_from_sum_so_the_proofs_have_teeth(tiny_ckpt, tmp_path):
    runs = {}
    for method in ("sum", "pcgrad"):
        runs[method] = tmp_path / method
        assert run_main(tiny_args(tiny_ckpt, runs[method], *NO_DROPOUT, *STEPS, f"--method.name={method}",
                                  "--data.batch_size=8")) == 0
    assert rel_diff(load_weights(runs["pcgrad"] / "final"), load_weights(runs["sum"] / "final")) > 1000 * 1e-6
    assert max(abs(a / b - 1) for a, b in zip(_norms(runs["pcgrad"]), _norms(runs["sum"]))) > 1000 * 1e-5
