"""Stateful methods (GradVac's targets, Nash-MTL's warm start, DWA's windows, FAMO's logits; the
per-coordinate state of ExcessMTL, MoCo and DB-MTL) resume bit-exactly after a SIGKILL: their
state is in every checkpoint (the small one in trainer_state.json, identical on every rank; the
per-coordinate one in each rank's method_columns.rank<r>.safetensors)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from conftest import load_weights, read_metrics, run_main, tiny_args
from test_reliability import _stable, _start, _wait_for

STATEFUL = {"gradvac": ["--method.name=gradvac", "--method.gradvac_beta=0.5"],
            "nash_mtl": ["--method.name=nash_mtl"],
            "dwa": ["--method.name=dwa", "--method.dwa_window=3"],
            "famo": ["--method.name=famo"],
            "excess_mtl": ["--method.name=excess_mtl"],
            "moco": ["--method.name=moco"],
            "db_mtl": ["--method.name=db_mtl"]}
COLUMNS = ("excess_mtl", "moco", "db_mtl")  # per-coordinate state


def load_weights_file(path):
    from safetensors.torch import load_file
    return load_file(str(path))


LONG = ["--train.epoch_steps=30", "--train.checkpoint_every=4", "--train.keep_last=2", "--data.max_eval=8",
        "--train.log_every=5", "--train.eval_every=0"]


@pytest.mark.parametrize("method", sorted(STATEFUL))
def test_stateful_method_resumes_bit_exactly_after_sigkill(tiny_ckpt, tmp_path, method, capsys):
    ref = tmp_path / "uninterrupted"
    assert run_main(tiny_args(tiny_ckpt, ref, *STATEFUL[method], *LONG)) == 0
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *STATEFUL[method], *LONG)
    proc = _start(args)
    _wait_for(run / "checkpoints" / "step_8", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "final").exists(), "the kill did not land mid-run"
    newest = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    folder = run / "checkpoints" / f"step_{newest}"
    saved = json.loads((folder / "trainer_state.json").read_text())["method_state"]
    columns = load_weights_file(folder / "method_columns.rank0.safetensors") if method in COLUMNS else {}
    assert (saved and any(v != 0 for s in saved.values() for v in s["values"])) or \
        any(bool(t.abs().sum() > 0) for t in columns.values()), f"{method}: no state in the checkpoint"
    capsys.readouterr()
    assert run_main(args) == 0
    assert f"step_{newest} at step {newest}" in capsys.readouterr().out, "did not resume from the newest checkpoint"
    want, got = load_weights(ref / "final"), load_weights(run / "final")
    assert all(torch.equal(want[k], got[k]) for k in want), f"{method}: resumed weights differ"
    assert _stable(read_metrics(run)) == _stable(read_metrics(ref))


@pytest.mark.dist
def test_per_coordinate_state_on_zero3_partitions_resumes_to_the_uninterrupted_run(launched):
    """MoCo under ZeRO-3, 2 ranks, inside the launch group: stopped (SIGUSR1) after step 2 of 6,
    resumed by the same command; each rank wrote its partitions' tracked gradients into the
    checkpoint and read them back, and the run ends with the uninterrupted run's weights."""
    from equivalence_design import FAULTS
    faults = {f["name"]: f for f in FAULTS}
    whole, whole_run = launched(faults["moco-zero3-whole"])
    stopped, run = launched(faults["moco-zero3-stopped"])
    assert whole.code == 0, whole.log[-3000:]
    assert stopped.code == 75 and "stop requested: checkpoint at step 2" in stopped.log, stopped.log[-3000:]
    resumed, _ = launched(faults["moco-zero3-resumed"])
    assert resumed.code == 0 and "step_2 at step 2" in resumed.log, resumed.log[-3000:]
    newest = max((run / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    parts = [load_weights_file(newest / f"method_columns.rank{r}.safetensors")["Y"] for r in (0, 1)]
    assert all(bool(p.abs().sum() > 0) for p in parts) and parts[0].shape == parts[1].shape, "each rank's partitions"
    want, got = load_weights(whole_run / "final"), load_weights(run / "final")
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert _stable(read_metrics(run)) == _stable(read_metrics(whole_run))
