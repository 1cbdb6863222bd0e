"""Checkpoints under faults: a kill inside a save or between its renames, a corrupted newest
checkpoint, a file-size limit (disk full) on a multi-rank run, leftovers, a resume with other
settings, a fresh start on an old run directory. Each test proves the fault happened (the
exit status, the files at the moment of the fault) and where the run resumed from."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, launch, load_weights, read_metrics, run_main, tiny_args, two_rank_args
from test_reliability import LONG, _alive, _ranks_of, _stable

HELPER = ROOT / "tests" / "helpers" / "fault_train.py"


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    assert run_main(tiny_args(tiny_ckpt, run, *LONG)) == 0
    return run


def _same_run(run, ref) -> None:
    want, got = load_weights(ref / "final"), load_weights(run / "final")
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ from the uninterrupted run"
    assert _stable(read_metrics(run)) == _stable(read_metrics(ref))


def _with_fault(fault: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTBERT_TEST_FAULT": fault, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(HELPER), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_kill_inside_save_state_resumes_from_the_previous_checkpoint(tiny_ckpt, tmp_path, uninterrupted, capsys):
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG)
    killed = _with_fault("in_save_state:15", args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    ckdir = run / "checkpoints"
    assert (ckdir / ".tmp_step_15" / "model.safetensors").exists(), "the kill did not come mid-save"
    assert not (ckdir / ".tmp_step_15" / "optimizer.bin").exists() and not (ckdir / "step_15").exists()
    assert run_main(args) == 0
    assert f"resumed from {ckdir / 'step_10'} at step 10" in capsys.readouterr().out
    assert not list(ckdir.glob(".tmp_*")), "the half-written folder was left behind"
    _same_run(run, uninterrupted)


def test_kill_between_the_renames_of_a_same_step_save_keeps_a_complete_checkpoint(tiny_ckpt, tmp_path,
                                                                                  uninterrupted, capsys):
    """keep_last=1, and a stop request saves step 10 a second time: the kill comes after the
    complete step_10 was renamed aside and before the new one took its place."""
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG, "--train.keep_last=1")
    killed = _with_fault("between_renames:10", args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    ckdir = run / "checkpoints"
    assert not (ckdir / "step_10").exists() and (ckdir / ".replaced_step_10" / "manifest.json").exists()
    assert not list(ckdir.glob("step_*")), "keep_last=1: the set-aside folder is the only complete checkpoint"
    assert run_main(args) == 0
    assert f"resumed from {ckdir / '.replaced_step_10'} at step 10" in capsys.readouterr().out
    assert not (ckdir / ".replaced_step_10").exists() and [p.name for p in ckdir.iterdir()] == ["step_40"]
    _same_run(run, uninterrupted)


def test_a_corrupted_newest_checkpoint_is_reported_and_the_previous_one_resumed(tiny_ckpt, tmp_path,
                                                                               uninterrupted, capsys):
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG, "--train.max_steps=0")
    full = tiny_args(tiny_ckpt, run, *LONG)
    killed = _with_fault("in_save_state:20", full)  # a run that stopped after step_15
    assert killed.returncode == -signal.SIGKILL
    weights = run / "checkpoints" / "step_15" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle: a bad disk block
    weights.write_bytes(bytes(data))
    assert run_main(args) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "step_15 is corrupt: model.safetensors does not match its SHA-256" in out, out
    assert f"resumed from {run / 'checkpoints' / 'step_10'} at step 10" in out
    _same_run(run, uninterrupted)


def test_resume_with_other_settings_is_refused_naming_them(tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(tiny_args(tiny_ckpt, run, "--train.epoch_steps=4", "--train.checkpoint_every=2")) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code = run_main(tiny_args(tiny_ckpt, run, "--train.epoch_steps=4", "--train.checkpoint_every=2",
                              "--data.batch_size=4", "--method.name=pcgrad", "--train.log_every=1"))
    err = capsys.readouterr().err
    assert code == 2 and "data.batch_size: 8 -> 4" in err and "method.name: 'sum' -> 'pcgrad'" in err, err
    assert "log_every" not in err  # free to change
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "a refused resume touched the run"
    result = launch("cpu_2proc.yaml", tiny_args(tiny_ckpt, run, "--train.epoch_steps=4", "--train.checkpoint_every=2"))
    # (torch elastic turns any rank's exit status into 1, and may stop the other rank first)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "config error: train.resume:" in out and "processes: 1 -> 2" in out, out[-3000:]


def mtbert_classes_pickled(folder: Path) -> dict[str, set[str]]:
    """file -> the mtbert modules its pickles name (GLOBAL / STACK_GLOBAL opcodes; a torch file is a
    zip of pickles). Empty: the checkpoints hold tensors and plain values only, so moving or renaming
    mtbert's modules (the package layout of issue 26) cannot break loading an older checkpoint."""
    import pickletools
    import zipfile
    found = {}
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix in (".json", ".safetensors"):
            continue
        blobs = ([zipfile.ZipFile(path).read(n) for n in zipfile.ZipFile(path).namelist() if n.endswith(".pkl")]
                 if zipfile.is_zipfile(path) else [path.read_bytes()])
        for blob in blobs:
            strings, memo, names = [None, None], {}, set()  # the strings pushed, in order; the memo
            try:
                for op, arg, _ in pickletools.genops(blob):
                    if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                        strings.append(arg)
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = strings[-1]
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                        memo[arg] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                        strings.append(memo.get(arg))
                    elif op.name == "GLOBAL":
                        names.add(arg.split(" ")[0])
                    elif op.name == "STACK_GLOBAL":
                        names.add(str(strings[-2]))
            except Exception:  # not a pickle (e.g. raw bytes): nothing to import
                continue
            if mtbert := {n for n in names if n.split(".")[0] == "mtbert"}:
                found[str(path.relative_to(folder))] = mtbert
    return found


def test_a_checkpoint_from_before_a_new_field_resumes_with_its_default(tiny_ckpt, tmp_path, capsys):
    """A checkpoint written before train.layer_lr_decay existed lacks it in its settings: it trained
    with the default, so a resume with the default continues and one with another value is refused."""
    import json

    from mtbert.training.checkpoint import write_manifest
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, "--train.epoch_steps=4", "--train.checkpoint_every=2")
    assert run_main(args) == 0
    states = sorted(run.glob("checkpoints/*/trainer_state.json"))
    assert states
    assert not mtbert_classes_pickled(run / "checkpoints"), "a checkpoint would not load once that module moved"
    for path in states:  # as an older mtbert wrote them
        state = json.loads(path.read_text())
        assert state["settings"].pop("train.layer_lr_decay") == 1.0
        path.write_text(json.dumps(state))
        write_manifest(path.parent)
    capsys.readouterr()
    assert run_main([*args, "--train.layer_lr_decay=0.5"]) == 2
    assert "train.layer_lr_decay: 1.0 -> 0.5" in capsys.readouterr().err
    assert run_main(args) == 0, capsys.readouterr().err


def test_a_fresh_start_moves_the_old_run_aside(tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, "--train.epoch_steps=4", "--train.checkpoint_every=2")
    assert run_main(args) == 0
    old = (run / "metrics.jsonl").read_text()
    assert run_main([*args, "--train.resume=false", "--train.log_every=1"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"moved it to {aside[0]}" in out
    assert (aside[0] / "metrics.jsonl").read_text() == old
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4], f"the new run's metrics hold old records: {steps}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]
    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert run_main(tiny_args(tiny_ckpt, stranger)) == 2
    assert "holds no mtbert run" in capsys.readouterr().err and (stranger / "notes.txt").exists()


def _limit_file_size(limit: int):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _launcher(run_args: list[str]) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "accelerate") if (ROOT / ".venv" / "bin" / "accelerate").exists()
            else "accelerate", "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
            "--main_process_port", str(free_port()), str(ROOT / "mtbert" / "train.py"), *run_args]


@pytest.mark.dist
def test_a_write_error_on_a_rank_stops_every_rank_and_keeps_the_last_checkpoint(tiny_ckpt, tmp_path,
                                                                               two_rank_uninterrupted):
    """RLIMIT_FSIZE (a full disk as the kernel reports it to a writer: EFBIG) on a 2-rank run:
    rank 0 cannot write the checkpoint's model file while rank 1 waits for it in a barrier. Now
    rank 0 says what happened and exits, the launcher stops rank 1, the last checkpoint is intact,
    and a relaunch resumes from it to the uninterrupted run's weights."""
    args_for = lambda run: two_rank_args(tiny_ckpt, run)
    full = two_rank_uninterrupted
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "first.log", "w") as log:  # 1. a run stopped (SIGUSR1 to its ranks) after step_5
        proc = subprocess.Popen(_launcher(args_for(run)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 240
        while not (run / "checkpoints" / "step_5").exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        for pid in _ranks_of(str(run)):
            os.kill(pid, signal.SIGUSR1)
        proc.wait(timeout=120)
    stopped = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert stopped < 40
    # 2. the same run resumed on a "full disk": files may not grow beyond 1 MB (the model file is 4 MB)
    with open(tmp_path / "full_disk.log", "w") as log:
        proc = subprocess.Popen(_launcher(args_for(run)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_limit_file_size(1 << 20))
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the ranks hang after a write error")
    out = (tmp_path / "full_disk.log").read_text()
    assert code != 0 and f"resumed from {run / 'checkpoints' / f'step_{stopped}'}" in out, out[-3000:]
    assert "rank 0 could not write" in out and "File too large" in out, out[-3000:]
    assert f"the newest complete checkpoint is {run / 'checkpoints' / f'step_{stopped}'}" in out, out[-3000:]
    time.sleep(1)
    assert not [p for p in _ranks_of(str(run)) if _alive(p)], "a rank outlived the failed save"
    from mtbert.training.checkpoint import list_checkpoints, verify
    assert [p.name for p in list_checkpoints(run)][-1] == f"step_{stopped}" and verify(list_checkpoints(run)[-1]) is None
    assert list((run / "checkpoints").glob(".tmp_step_*")), "the failed save left no trace: no fault happened"
    # 3. space again: the same command resumes from the intact checkpoint
    result = launch("cpu_2proc.yaml", args_for(run))
    assert result.returncode == 0 and f"checkpoints/step_{stopped} at step {stopped}" in result.stdout, result.stderr[-3000:]
    assert not list((run / "checkpoints").glob(".tmp_*"))
    want, got = load_weights(full / "final"), load_weights(run / "final")
    assert all(torch.equal(want[k], got[k]) for k in want)
