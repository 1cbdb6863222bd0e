"""Proofs with real processes (2 ranks, gloo, tiny model), launched the way users launch:
N steps on 2 ranks with per-rank batch b end with the parameters of 1 process with batch 2b."""

import json

import pytest

from conftest import NO_DROPOUT, launch, load_weights, max_abs_diff, rel_diff, run_main, tiny_args

pytestmark = pytest.mark.dist
STEPS = ["--train.epoch_steps=3", "--data.max_eval=16", "--train.grad_clip=1.0", "--train.warmup=0"]


@pytest.fixture(scope="module")
def references(tiny_ckpt, tmp_path_factory):
    """Single-process runs on the concatenated global batch (batch 8 = 2 ranks x 4)."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for method in ("sum", "pcgrad"):
        run = root / method
        assert run_main(tiny_args(tiny_ckpt, run, *NO_DROPOUT, *STEPS, f"--method.name={method}",
                                  "--data.batch_size=8")) == 0
        out[method] = load_weights(run / "final")
    return out


def _check_launch(result, run, ranks=2):
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"{ranks} process(es)" in log, "the launch did not start 2 ranks of one job"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == ranks
    return summary


CASES = [("cpu_2proc.yaml", "sum", "allreduce", 1e-6), ("cpu_2proc.yaml", "pcgrad", "allreduce", 1e-6),
         ("cpu_2proc.yaml", "pcgrad", "sharded", 1e-6),
         ("zero1.yaml", "pcgrad", "sharded", 1e-5), ("zero2.yaml", "pcgrad", "sharded", 1e-5),
         ("zero2.yaml", "pcgrad", "allreduce", 1e-5), ("zero2.yaml", "sum", "allreduce", 1e-5),
         ("zero3.yaml", "sum", "allreduce", 1e-5)]


@pytest.mark.parametrize("config,method,reducer,tol", CASES)
def test_two_ranks_equal_one_process_on_the_global_batch(tiny_ckpt, tmp_path, references, config, method, reducer, tol):
    run = tmp_path / "run"
    result = launch(config, tiny_args(tiny_ckpt, run, *NO_DROPOUT, *STEPS, f"--method.name={method}",
                                      f"--method.reducer={reducer}", "--data.batch_size=4"))
    summary = _check_launch(result, run)
    if "zero3" not in config:
        assert summary["params_agree_across_ranks"] is True
    got = load_weights(run / "final")
    diff, worst = rel_diff(got, references[method]), max_abs_diff(got, references[method])
    assert diff <= tol, f"{config} {method}/{reducer}: relative parameter difference {diff:.2e}"
    assert worst <= 10 * tol, f"{config} {method}/{reducer}: max abs parameter difference {worst:.2e}"


def test_pcgrad_differs_from_sum_so_the_proofs_have_teeth(references):
    assert rel_diff(references["pcgrad"], references["sum"]) > 1000 * 1e-6


def test_two_rank_bf16_pcgrad_keeps_ranks_identical(tiny_ckpt, tmp_path):
    """bf16 autocast across ranks: skip decisions and updates come from the all-reduced Gram
    matrix, so both ranks must end bit-identical."""
    run = tmp_path / "run"
    result = launch("cpu_2proc.yaml", tiny_args(tiny_ckpt, run, *STEPS, "--method.name=pcgrad",
                                                "--method.reducer=sharded", "--train.precision=bf16",
                                                "--data.batch_size=4"))
    summary = _check_launch(result, run)
    assert summary["params_agree_across_ranks"] is True
