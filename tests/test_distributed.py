"""Launch-level proofs outside the equivalence matrix (tests/test_equivalence.py): ZeRO-3 with
the summed loss, refusals that must happen before any work, and a check that the matrix's
comparisons have teeth (PCGrad differs from the summed loss by far more than the tolerance)."""

import json

import pytest
from conftest import NO_DROPOUT, launch, load_weights, max_abs_diff, read_metrics, rel_diff, run_main, tiny_args

pytestmark = pytest.mark.dist
STEPS = ["--train.epoch_steps=3", "--data.max_eval=16", "--train.grad_clip=1.0", "--train.warmup=0",
         "--train.log_every=1", "--train.grad_accum=2"]


def _norms(run):
    return [r["grad_norm"] for r in read_metrics(run) if r["split"] == "train"]


def test_zero3_summed_loss_equals_one_process_with_accumulation(tiny_ckpt, tmp_path):
    ref = tmp_path / "ref"
    assert run_main(tiny_args(tiny_ckpt, ref, *NO_DROPOUT, *STEPS, "--data.batch_size=8",
                              "--train.idle_params=step")) == 0
    run = tmp_path / "run"
    result = launch("zero3.yaml", tiny_args(tiny_ckpt, run, *NO_DROPOUT, *STEPS, "--data.batch_size=4"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    for got, want in zip(_norms(run), _norms(ref), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    got, want = load_weights(run / "final"), load_weights(ref / "final")
    assert rel_diff(got, want) <= 1e-5 and max_abs_diff(got, want) <= 1e-4


def test_deepspeed_refuses_keep_idle_params_and_per_task_zero3_before_any_work(tiny_ckpt, tmp_path):
    for config, extra, field in (("zero2.yaml", ["--train.idle_params=keep"], "train.idle_params"),
                                 ("zero3.yaml", ["--method.name=pcgrad"], "method.name")):
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
