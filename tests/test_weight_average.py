"""train.ema_decay: the weight average the run evaluates, keeps as best, writes as final and
predicts with — its update rule, that the raw weights come back after an evaluation, that it is
checkpointed and resumes bit-exactly, and the set-ups refused. (N ranks vs 1 process:
tests/test_equivalence.py, EXTRA.)"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, load_weights, read_metrics, run_main, tiny_args

from mtbert.training.weight_average import WeightAverage


def _module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_the_average_follows_the_warmed_up_decay_and_gives_the_raw_weights_back():
    m = _module()
    avg = WeightAverage(m, decay=0.9)
    want = [p.detach().clone() for p in m.parameters()]
    for t in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))  # 0.1, 0.18, 0.25, 0.3: warmed up
        want = [d * w + (1 - d) * p.detach() for w, p in zip(want, m.parameters())]
    for a, w in zip(avg.average, want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-7)
    raw = [p.detach().clone() for p in m.parameters()]
    gap = sum(float((r - w).pow(2).sum()) for r, w in zip(raw, want)) ** 0.5
    assert avg.gap() == pytest.approx(gap, rel=1e-6)
    with avg.applied():
        assert all(torch.equal(p, a) for p, a in zip(m.parameters(), avg.average))
    assert all(torch.equal(p, r) for p, r in zip(m.parameters(), raw)), "the raw weights were not restored"


def test_the_state_round_trips_and_another_model_is_refused():
    m = _module()
    avg = WeightAverage(m, 0.99)
    avg.update()
    state = avg.state_dict()
    other = WeightAverage(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), 0.99)  # other weights
    other.load_state_dict(state)
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.average, avg.average))
    with pytest.raises(ValueError, match="weight average is of 4 other parameters than this model's 2"):
        WeightAverage(torch.nn.Linear(3, 4), 0.99).load_state_dict(state)


def test_decay_out_of_range_is_refused(tiny_ckpt, tmp_path, capsys):
    assert run_main(tiny_args(tiny_ckpt, tmp_path / "run", "--train.ema_decay=1")) == 2
    assert "train.ema_decay: must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


LONG = ["--train.epoch_steps=12", "--train.checkpoint_every=3", "--train.eval_every=4", "--train.log_every=1",
        "--data.max_eval=8", "--train.ema_decay=0.8"]


@pytest.fixture(scope="module")
def averaged(tiny_ckpt, tmp_path_factory):
    run = tmp_path_factory.mktemp("ema") / "run"
    assert run_main(tiny_args(tiny_ckpt, run, *LONG)) == 0
    return run


def test_final_weights_are_the_checkpointed_average_not_the_raw_weights(averaged):
    from safetensors.torch import load_file
    last = averaged / "checkpoints" / "step_12"
    raw = load_file(str(last / "model.safetensors"))
    state = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)
    final = load_weights(averaged / "final")
    names = state["names"]  # the module's parameters, in its order
    assert sorted(names) == sorted(raw) and state["updates"] == 12
    for name, a in zip(names, state["average"]):
        assert torch.equal(final[name], a), f"final/{name} is not the average"
    assert any(not torch.equal(final[n], raw[n]) for n in names), "final/ holds the raw weights"
    train = [r for r in read_metrics(averaged) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    gap = sum(float((raw[n].float() - a).pow(2).sum()) for n, a in zip(names, state["average"])) ** 0.5
    assert train[-1]["ema_gap"] == pytest.approx(gap, rel=1e-5)  # logged at step 12 = the checkpoint's


def test_a_killed_run_with_an_average_resumes_bit_identical(tiny_ckpt, tmp_path, averaged):
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "mtbert" / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_6").exists():
        assert proc.poll() is None, "the run ended before step 6"
        assert time.time() < deadline, "no checkpoint at step 6"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # the fault happened
    assert not (run / "final").exists()
    assert run_main(args) == 0
    log = [r for r in read_metrics(run) if r["split"] == "train"]
    ref = [r for r in read_metrics(averaged) if r["split"] == "train"]
    assert log[0]["step"] == 1  # nothing lost, nothing repeated
    assert [r["ema_gap"] for r in log] == [r["ema_gap"] for r in ref]
    got, want = load_weights(run / "final"), load_weights(averaged / "final")
    assert all(torch.equal(got[k], want[k]) for k in want), "the resumed average differs"
    dev = [(r["step"], r["overall"]) for r in read_metrics(run) if r["split"] == "dev"]
    assert dev == [(r["step"], r["overall"]) for r in read_metrics(averaged) if r["split"] == "dev"]


@pytest.mark.dist
def test_a_zero3_average_stopped_and_resumed_ends_as_the_uninterrupted_run(launched):
    """ZeRO-3 (2 ranks): each rank averages its partitions; a stop request after step 2 writes a
    checkpoint (the average gathered whole) and exits 75; the same command resumes (each rank
    slices its partition back) and ends with the uninterrupted run's weights and ema_gap."""
    from equivalence_design import FAULTS
    faults = {f["name"]: f for f in FAULTS}
    whole, whole_run = launched(faults["ema-zero3-whole"])
    stopped, run = launched(faults["ema-zero3-stopped"])
    assert whole.code == 0, whole.log[-3000:]
    assert stopped.code == 75 and "stop requested: checkpoint at step 2" in stopped.log, stopped.log[-3000:]
    assert "done:" not in stopped.log, "the stop did not land mid-run"
    resumed, _ = launched(faults["ema-zero3-resumed"])  # (the group ran it after the stop, in the same directory)
    assert resumed.code == 0 and "resumed from" in resumed.log and "step_2 at step 2" in resumed.log, resumed.log[-3000:]
    newest = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    saved = torch.load(run / "checkpoints" / f"step_{newest}" / "custom_checkpoint_0.pkl", weights_only=False)
    final = load_weights(whole_run / "final")
    assert saved["updates"] == newest and all(a.shape == final[n].shape for n, a in zip(saved["names"], saved["average"])), \
        "the checkpoint does not hold the whole average"
    gaps = lambda r: [m["ema_gap"] for m in read_metrics(r) if m["split"] == "train"]
    assert gaps(run) == pytest.approx(gaps(whole_run), rel=1e-6)
    want, got = load_weights(whole_run / "final"), load_weights(run / "final")
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
