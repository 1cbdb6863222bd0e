"""One run directory, one run: the lock that stops a second launch into a running directory
(released by the kernel when its holder dies), and Ctrl-C (SIGINT) as a stop request — a
checkpoint, one line, exit 130; a second Ctrl-C stops at once — on 1 process and 2 ranks.
Every test proves its fault happened (the other run was alive, the signal arrived) and that
nothing in the run directory was lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, free_port, read_metrics, tiny_args
from test_reliability import _start, _wait_for

from mtbert.training.checkpoint import verify
from mtbert.training.run_lock import lock_path

LONG = ["--train.epoch_steps=100000", "--train.checkpoint_every=5", "--train.log_every=1", "--train.eval_every=0",
        "--data.batch_size=4", "--data.max_eval=8", "--train.predict_test=false"]
# Ctrl-C runs: stopped after their first logged step (a tiny step takes ~20 ms here); the
# resume finishes the 400 steps
SHORT = [*LONG, "--train.epoch_steps=400", "--train.checkpoint_every=1000"]


@pytest.fixture(autouse=True)
def _no_survivors(monkeypatch):
    """A failing test leaves no run training in the background (a 100000-step run would slow every
    later test): each process started here has its session killed at teardown."""
    started = []
    real = subprocess.Popen

    def popen(*a, **kw):
        started.append(real(*a, **kw))
        return started[-1]
    monkeypatch.setattr(subprocess, "Popen", popen)
    yield
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _launch(args, log):
    """accelerate launch, 2 CPU ranks, in a session of its own (what a terminal's process group is)."""
    cmd = [str(ROOT / ".venv" / "bin" / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "mtbert" / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _steps(run) -> list[int]:
    return [r["step"] for r in read_metrics(run) if r["split"] == "train"]


def _first_train_record(run, proc):
    _wait_for(run / "metrics.jsonl", proc)
    while not _steps(run):
        assert proc.poll() is None, "the run ended before its first step"
        time.sleep(0.05)


@pytest.mark.dist
def test_a_second_launch_is_refused_a_killed_run_resumes_and_ctrl_c_stops_every_rank(tiny_ckpt, tmp_path):
    """2 ranks throughout, the same command each time: (1) launched again while it trains (an
    sbatch submitted twice): both ranks refuse before any write, naming the holder; (2) SIGKILL:
    the kernel releases the lock, the same command takes it and resumes; (3) Ctrl-C (SIGINT to
    the launcher's process group, as a terminal sends it): every rank checkpoints one step, exit
    130. The metrics hold every step once."""
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG)  # long: stopped by the test
    first = _launch(args, tmp_path / "first.log")
    _first_train_record(run, first)
    config_written = (run / "config.json").stat().st_mtime_ns
    holder = json.loads(lock_path(run).read_text())
    # 1. the same launch again while the first trains
    second = _launch(args, tmp_path / "second.log")
    assert second.wait(timeout=180) != 0
    out = (tmp_path / "second.log").read_text()
    assert first.poll() is None, "the first run was not alive during the second launch: no fault happened"
    os.kill(holder["pid"], 0)  # the lock's holder (the first launch's rank 0) is alive
    assert f"config error: train.out_dir: {run} is in use by another run (host {socket.gethostname()}, " \
           f"pid {holder['pid']}," in out, out[-3000:]
    # both ranks say it; the launcher's own report of a failed rank (torch elastic) is not ours
    assert out.count("is in use by another run") == 2 and f'File "{ROOT / "mtbert"}' not in out, out[-3000:]
    # a fresh start would have moved the directory aside (run.replaced-*) and written its config
    assert (run / "config.json").stat().st_mtime_ns == config_written, "the refused launch wrote its config"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run")] == ["run"], \
        "the refused launch moved the running directory aside"
    # 2. SIGKILL of the first launch (its ranks die with it): the lock goes with them
    while not _complete(run):
        assert first.poll() is None, "the first run ended"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL, "the kill did not land"
    _wait_dead(holder["pid"])
    # the kill may land mid-write: the resume takes the last complete checkpoint
    killed_at = max(_complete(run))
    third = _launch(args, tmp_path / "third.log")
    _wait_for(run / "checkpoints" / f"step_{killed_at + 5}", third)
    # 3. Ctrl-C
    os.killpg(third.pid, signal.SIGINT)
    assert third.wait(timeout=120) == 130
    text = (tmp_path / "third.log").read_text()
    assert f"resumed from {run / 'checkpoints' / f'step_{killed_at}'}" in text and "in use" not in text, text[-3000:]
    stopped = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert text.count(f"interrupted: checkpoint at step {stopped} written in {run / 'checkpoints'}; run the same "
                      f"command to resume (exit 130)") == 1, text[-3000:]  # the main rank says it
    assert "2 process(es)" in text and f'File "{ROOT / "mtbert"}' not in text, text[-3000:]
    assert verify(run / "checkpoints" / f"step_{stopped}") is None, "the checkpoint of the stop is not complete"
    assert not (run / "final").exists() and not lock_is_held(run)
    # the resume cut the killed run's records after killed_at: every step once, in order
    assert _steps(run) == list(range(1, stopped + 1)), "steps lost or written twice"


def _complete(run) -> list[int]:
    """Steps of the complete checkpoints (the run rotates old ones away meanwhile)."""
    steps = []
    for p in (run / "checkpoints").glob("step_*"):
        try:
            steps += [int(p.name.split("_")[1])] if verify(p) is None else []
        except OSError:  # removed while read
            pass
    return steps


def _wait_dead(pid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"rank 0 (pid {pid}) outlived its SIGKILLed launcher")


def lock_is_held(run) -> bool:
    import fcntl
    with open(lock_path(run)) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def test_ctrl_c_checkpoints_says_how_to_resume_and_exits_130(tiny_ckpt, tmp_path):
    """1 process: the SIGINT a terminal sends; then a resume finishes the run, each step once."""
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *SHORT)
    proc = _start(args, log=tmp_path / "first.log")
    _first_train_record(run, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    out = (tmp_path / "first.log").read_text()
    stopped = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert f"interrupted: checkpoint at step {stopped} written in {run / 'checkpoints'}; run the same command to " \
           f"resume (exit 130)" in out, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert not (run / "final").exists() and _steps(run)[-1] == stopped, "the Ctrl-C did not land mid-run"
    proc = _start(args, log=tmp_path / "resumed.log")
    proc.wait(timeout=400)
    text = (tmp_path / "resumed.log").read_text()
    assert proc.returncode == 0 and f"step_{stopped} at step {stopped}" in text, text[-3000:]
    steps = _steps(run)
    assert steps == list(range(1, 401)), "steps lost or written twice"


def test_a_second_ctrl_c_stops_at_once_with_one_line(tiny_ckpt, tmp_path):
    """Two Ctrl-C during start-up (model load, tokenization): the second ends the process at once,
    without a checkpoint and without a traceback."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "mtbert" / "train.py"), *tiny_args(tiny_ckpt, run, *LONG)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None, "the first Ctrl-C alone ended the run"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    out = proc.stdout.read()
    assert "interrupted again: stopping now without a checkpoint" in out and "Traceback" not in out, out[-3000:]
    assert not (run / "checkpoints").exists()
