"""FSDP2 (engines/fsdp2.py): N ranks whose model is fully_shard'ed on a CPU mesh (gloo) take the
same steps as 1 process on the global batch — per-step gradient norm and final parameters — for
the summed path and every gradient method, with each rank holding only its shard of the rows.
Step level (tests/helpers/fsdp2_steps.py under torchrun): Accelerate drops FSDP on CPU, so the
trainer refuses FSDP launches (the last test) and the launch path is not proved here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, launch, tiny_args

pytestmark = pytest.mark.dist
BALANCED = ["--heads.sts.weight=0.01"]  # as in the equivalence matrix: norm-rescaling methods need it
CASES = [  # (ranks, grad_accum, overrides)
    (2, 2, ["--method.name=sum"]),
    (3, 1, ["--method.name=mean", "--train.idle_params=step"]),
    (2, 1, ["--method.name=pcgrad"]),
    (3, 2, ["--method.name=gse"]),
    (2, 2, ["--method.name=pcgrad", "--method.gram_blocks=layer", *BALANCED]),
    (3, 1, ["--method.name=mgda", *BALANCED]),
    (2, 2, ["--method.name=cagrad", *BALANCED]),
    (2, 1, ["--method.name=imtl_g", *BALANCED]),
    (3, 2, ["--method.name=aligned_mtl", *BALANCED]),
    (2, 1, ["--method.name=upgrad", *BALANCED]),
    (2, 2, ["--method.name=dualproj", *BALANCED]),
    (3, 1, ["--method.name=nash_mtl", *BALANCED]),
    (2, 2, ["--method.name=gradvac", "--method.gradvac_beta=0.5", "--method.gram_blocks=layer", *BALANCED]),
]


def _run(tmp_path, ckpt, ranks, accum, overrides) -> dict:
    out = tmp_path / "result.json"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
           str(ROOT / "tests" / "helpers" / "fsdp2_steps.py"), str(out), str(ckpt), "3", str(accum), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("ranks,accum,overrides", CASES,
                         ids=lambda v: v[0].split("=")[1] + ("_layer" if len(v) > 1 and "layer" in v[1] else "")
                         if isinstance(v, list) else str(v))
def test_fsdp2_ranks_equal_one_process_on_the_global_batch(tiny_ckpt, tmp_path, ranks, accum, overrides):
    got = _run(tmp_path, tiny_ckpt, ranks, accum, overrides)
    assert got["world"] == ranks
    for step, (g, r) in enumerate(zip(got["norms"]["fsdp2"], got["norms"]["ref"])):
        assert abs(g / r - 1) <= 1e-5, f"step {step}: gradient norm {g:.6g} vs 1 process {r:.6g}"
    assert got["param_rel_diff"] <= 1e-6 and got["worst_tensor"] <= 1e-3, got
    if got["shared_params"]:  # per-task: each rank's rows hold its shard only; together, every column
        cols = got["local_columns"]
        assert max(cols) < got["shared_params"] and sum(cols) == got["shared_params"], cols


def test_an_fsdp_launch_is_refused_before_any_work(tiny_ckpt, tmp_path):
    """Accelerate sets DistributedType.FSDP only for GPU back-ends: on CPU the fsdp2.yaml launch
    would train unsharded (or as independent processes) without a word."""
    run = tmp_path / "run"
    result = launch("fsdp2.yaml", tiny_args(tiny_ckpt, run, "--method.name=pcgrad"))
    assert result.returncode != 0
    assert "config error: accelerate config" in result.stderr and "FSDP" in result.stderr, result.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()
