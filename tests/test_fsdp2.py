"""FSDP2 (engines/fsdp2.py) at the step level: with the model fully_shard'ed on a CPU mesh (gloo),
each rank's per-task rows hold only its shard of the columns (together: every column), and the
steps equal one process's. The launch (accelerate_configs/fsdp2.yaml) is proved for every method
in the equivalence matrix (tests/test_equivalence.py, engine fsdp2); this checks what the matrix
cannot see: where the rows live (tests/helpers/fsdp2_steps.py under torchrun, one launch)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, free_port
from harness import LAUNCHES, in_launches

pytestmark = pytest.mark.dist
BALANCED = ["--heads.sts.weight=0.01"]  # as in the equivalence matrix: norm-rescaling methods need it
CASES = [  # (ranks, grad_accum, overrides): one launch of 2 ranks
    (2, 2, ["--method.name=pcgrad"]),
    (2, 1, ["--method.name=gradvac", "--method.gradvac_beta=0.5", "--method.gram_blocks=layer", *BALANCED]),
]


def case_id(ranks, accum, overrides) -> str:
    name = overrides[0].split("=")[1] + ("_layer" if any("gram_blocks=layer" in o for o in overrides) else "")
    return f"{ranks}-{accum}-{name}"


@pytest.fixture(scope="session")
def fsdp2_results(tiny_ckpt, tmp_path_factory):
    """world size -> case id -> the helper's result (or ("crashed", output)): one torchrun per
    world size runs all its cases in turn (tests/harness.py: a crash relaunches the rest)."""
    root, groups = tmp_path_factory.mktemp("fsdp2"), {}

    def get(ranks: int) -> dict:
        if ranks in groups:
            return groups[ranks]
        cases = [SimpleNamespace(id=case_id(*c), accum=c[1], overrides=c[2]) for c in CASES if c[0] == ranks]

        def launch(remaining):
            plan = root / f"plan-{ranks}-{len(remaining)}.json"
            plan.write_text(json.dumps({"ckpt": str(tiny_ckpt), "steps": 3, "cases": [
                {"out": str(root / f"{c.id}.json"), "accum": c.accum, "overrides": c.overrides} for c in remaining]}))
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "--master_port",
                   str(free_port()), str(ROOT / "tests" / "helpers" / "fsdp2_steps.py"), str(plan)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            start = time.time()
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60 + 60 * len(remaining))
            LAUNCHES.append({"config": "torchrun fsdp2_steps.py", "processes": ranks, "cases": len(remaining),
                             "seconds": round(time.time() - start, 1)})
            return res.returncode, res.stdout + res.stderr

        def finished(case):
            out = root / f"{case.id}.json"
            return json.loads(out.read_text()) if out.exists() else None
        groups[ranks] = in_launches(cases, launch, finished)
        return groups[ranks]
    return get


@pytest.mark.parametrize("ranks,accum,overrides", CASES, ids=[case_id(*c) for c in CASES])
def test_fsdp2_ranks_equal_one_process_on_the_global_batch(fsdp2_results, ranks, accum, overrides):
    got = fsdp2_results(ranks)[case_id(ranks, accum, overrides)]
    assert not isinstance(got, tuple), f"crashed: {got[1]}"
    assert got["world"] == ranks
    for step, (g, r) in enumerate(zip(got["norms"]["fsdp2"], got["norms"]["ref"])):
        assert abs(g / r - 1) <= 1e-5, f"step {step}: gradient norm {g:.6g} vs 1 process {r:.6g}"
    assert got["param_rel_diff"] <= 1e-6 and got["worst_tensor"] <= 1e-3, got
    if got["shared_params"]:  # per-task: each rank's rows hold its shard only; together, every column
        cols = got["local_columns"]
        assert max(cols) < got["shared_params"] and sum(cols) == got["shared_params"], cols
