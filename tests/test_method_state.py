"""Stateful methods (GradVac's targets, Nash-MTL's warm start, DWA's windows, FAMO's logits)
resume bit-exactly after a SIGKILL: their state is in every checkpoint, identical on every rank."""

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
            "famo": ["--method.name=famo"]}
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
    saved = json.loads((run / "checkpoints" / f"step_{newest}" / "trainer_state.json").read_text())["method_state"]
    assert saved and any(v != 0 for s in saved.values() for v in s["values"]), f"{method}: no state in the checkpoint"
    capsys.readouterr()
    assert run_main(args) == 0
    assert f"step_{newest} at step {newest}" in capsys.readouterr().out, "did not resume from the newest checkpoint"
    want, got = load_weights(ref / "final"), load_weights(run / "final")
    assert all(torch.equal(want[k], got[k]) for k in want), f"{method}: resumed weights differ"
    assert _stable(read_metrics(run)) == _stable(read_metrics(ref))
