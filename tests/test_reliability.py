"""Faults lose nothing: kill -9 and resume, graceful stop, NaN/inf and fp16 overflow steps,
half-written outputs, determinism, and randomly corrupted data files."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, launch, load_weights, read_metrics, run_main, tiny_args, two_rank_args

LONG = ["--train.epoch_steps=40", "--train.checkpoint_every=5", "--train.keep_last=3", "--data.max_eval=8",
        "--train.log_every=7",  # checkpoints (every 5) fall inside log windows: the window is checkpointed
        "--train.eval_every=0"]
VOLATILE = ("time", "examples_per_s", "tokens_per_s")


def _start(args, launcher=None, log=None):
    """log: a file for the output (as under Slurm), instead of a pipe to this test: a rank that
    outlives its launcher dies of the broken pipe on its next print, which hides what we test."""
    cmd = launcher or [sys.executable, str(ROOT / "mtbert" / "train.py")]
    # Same thread count as the in-process reference run: CPU reductions are bit-reproducible
    # for a fixed number of threads, not across thread counts.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.02)


def _stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tiny_ckpt, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    assert run_main(tiny_args(tiny_ckpt, run, *LONG)) == 0
    return run


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_ckpt, tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG)
    proc = _start(args)
    _wait_for(run / "checkpoints" / "step_10", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert run_main(args) == 0
    ref, got = load_weights(uninterrupted / "final"), load_weights(run / "final")
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed weights differ from the uninterrupted run"
    assert _stable(read_metrics(run)) == _stable(read_metrics(uninterrupted))


def test_sigterm_checkpoints_exits_75_and_resumes(tiny_ckpt, tmp_path, uninterrupted):
    run = tmp_path / "run"
    args = tiny_args(tiny_ckpt, run, *LONG)
    proc = _start(args)
    _wait_for(run / "checkpoints" / "step_5", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:]
    assert "stop requested: checkpoint at step" in out
    stopped_at = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert stopped_at >= 5
    assert run_main(args) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 40
    ref, got = load_weights(uninterrupted / "final"), load_weights(run / "final")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _stable(read_metrics(run)) == _stable(read_metrics(uninterrupted))


def test_sigterm_during_start_up_is_kept_and_the_run_resumes_from_step_0(tiny_ckpt, tmp_path, uninterrupted):
    """Before: a TERM during imports, model load or tokenization killed the process (no handler
    yet): nothing saved, and under Slurm no stop file, so no requeue."""
    run, log = tmp_path / "run", tmp_path / "out.log"
    args = tiny_args(tiny_ckpt, run, *LONG)
    proc = _start(args, log=log)
    time.sleep(0.5)  # python is importing torch
    assert proc.poll() is None and "model:" not in log.read_text(), "too late: start-up was over"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()[-2000:]
    out = log.read_text()
    assert "stop requested: checkpoint at step 0 written" in out and "[dev]" not in out, out[-2000:]
    assert run_main(args) == 0
    ref, got = load_weights(uninterrupted / "final"), load_weights(run / "final")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _stable(read_metrics(run)) == _stable(read_metrics(uninterrupted))


def _ranks_of(marker: str) -> list[int]:
    """Pids of training ranks (not the launcher) whose command line holds ``marker``."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if marker in cmd and "mtbert/train.py" in cmd and " launch " not in cmd:
            pids.append(int(p.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.dist
def test_two_rank_sigkill_of_the_launcher_kills_its_ranks_and_resumes_bit_identical(tiny_ckpt, tmp_path,
                                                                                     two_rank_uninterrupted):
    """SIGKILL of `accelerate launch` (what an OOM killer or node agent does): torch elastic starts
    each rank in its own session, so only the launcher dies unless the ranks die with it. Proves
    the ranks are gone, that nothing was written after the kill, and where the relaunch resumed."""
    args_for = lambda run: two_rank_args(tiny_ckpt, run)  # 40 steps
    full = two_rank_uninterrupted
    run = tmp_path / "run"
    launcher = [str(ROOT / ".venv" / "bin" / "accelerate") if (ROOT / ".venv" / "bin" / "accelerate").exists()
                else "accelerate", "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
                "--main_process_port", str(free_port()), str(ROOT / "mtbert" / "train.py")]
    proc = _start(args_for(run), launcher, log=tmp_path / "launch.log")
    _wait_for(run / "checkpoints" / "step_5", proc)
    ranks = [p for p in _ranks_of(str(run)) if p != proc.pid]
    assert len(ranks) == 2, f"expected 2 rank processes, found {ranks}"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: the ranks are in sessions of their own
    proc.wait()
    newest = lambda: max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    at_kill = newest()
    deadline = time.time() + 5
    while any(_alive(p) for p in ranks) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # an orphan would go on (40 steps take ~4 s here) and write step_10, 15, ...
    assert not any(_alive(p) for p in ranks), "ranks outlived their launcher"
    assert newest() == at_kill < 40 and not (run / "summary.json").exists(), "ranks trained after the kill"
    result = launch("cpu_2proc.yaml", args_for(run))
    out = result.stdout + result.stderr
    assert result.returncode == 0 and f"checkpoints/step_{at_kill} at step {at_kill}" in out, out[-3000:]
    ref, got = load_weights(full / "final"), load_weights(run / "final")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_nan_loss_steps_are_skipped_and_counted(tiny_ckpt, tmp_path, monkeypatch):
    from mtbert.model.heads import TaskHead
    real, calls = TaskHead.loss, {"n": 0}

    def flaky(self, out, y):
        calls["n"] += 1
        loss = real(self, out, y)
        return loss * float("nan") if calls["n"] in (7, 8, 9) else loss  # steps 3 (sst,quora,sts)
    monkeypatch.setattr(TaskHead, "loss", flaky)
    run = tmp_path / "run"
    assert run_main(tiny_args(tiny_ckpt, run, "--method.name=pcgrad")) == 0
    skipped = sum(r["skipped"] for r in read_metrics(run) if r["split"] == "train")
    assert skipped == 1


def test_persistent_nan_stops_with_message_and_last_good_checkpoint(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from mtbert.model.heads import TaskHead
    real, calls = TaskHead.loss, {"n": 0}

    def broken_after_step_4(self, out, y):
        calls["n"] += 1
        loss = real(self, out, y)
        return loss * float("inf") if calls["n"] > 12 else loss
    monkeypatch.setattr(TaskHead, "loss", broken_after_step_4)
    run = tmp_path / "run"
    code = run_main(tiny_args(tiny_ckpt, run, "--train.epoch_steps=12", "--train.checkpoint_every=4",
                              "--train.max_bad_steps=3"))
    assert code == 3
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().out
    last = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert last == 4
    weights = load_weights(run / "checkpoints" / "step_4")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_fp16_overflow_step_is_skipped_and_scale_halves(tiny_ckpt):
    """The per-task path with fp16 autocast (explicit, on CPU) and the LossScaler."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from mtbert.config.cli import parse_args
    from mtbert.config.schema import HeadCfg
    from mtbert.data.batching import load_split
    from mtbert.data.tasks import build_specs
    from mtbert.methods.phases import Phase
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.optim.loss_scaler import LossScaler
    from mtbert.training.step import Stepper
    cfg = parse_args([f"--model.checkpoint={tiny_ckpt}", "--method.name=pcgrad", "--data.tasks=sst,sts"])
    enc, folder = from_pretrained(str(tiny_ckpt))
    specs = build_specs(cfg)
    model = MultitaskModel(enc, specs, {t: HeadCfg() for t in specs})
    tok = AutoTokenizer.from_pretrained(str(folder))
    splits = {t: load_split(specs[t], "train", cfg, tok, model.heads[t].kind, lambda *a: None) for t in specs}
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = LossScaler(scale=2.0 ** 120)  # overflows fp16 (max 65504) on the first backward
    stepper = Stepper(acc, model, opt, sched, cfg, list(specs),
                      autocast=lambda: torch.autocast("cpu", dtype=torch.float16), scaler=scaler)
    batch = [{t: s.batch(list(range(8))) for t, s in splits.items()}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = stepper.step(0, batch, Phase(tuple(specs), 1, 1, "t"))
    assert stats["skipped"] is True and scaler.scale == 2.0 ** 119
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scaler.scale = 2.0 ** 8
    stats = stepper.step(1, batch, Phase(tuple(specs), 1, 1, "t"))
    assert stats["skipped"] is False
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_runs_with_pcgrad_and_smart(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    assert run_main(tiny_args(tiny_ckpt, run, "--train.precision=bf16", "--method.name=pcgrad",
                              "--method.smart=true", "--train.epoch_steps=2")) == 0
    assert all(r["skipped"] == 0 for r in read_metrics(run) if r["split"] == "train")


def test_crash_while_writing_predictions_keeps_the_previous_file(tmp_path):
    from mtbert.training.evaluate import write_predictions
    path = tmp_path / "sst-dev-output.csv"
    write_predictions(path, "Predicted_Sentiment", ["a", "b"], [1, 2], False)
    before = path.read_text()

    def exploding():
        yield 3
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        write_predictions(path, "Predicted_Sentiment", ["a", "b"], exploding(), False)
    assert path.read_text() == before
    assert list(tmp_path.iterdir()) == [path]


def test_same_seed_same_metrics(tiny_ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert run_main(tiny_args(tiny_ckpt, run, "--method.name=pcgrad", "--train.schedule=proportional")) == 0
    assert _stable(read_metrics(a)) == _stable(read_metrics(b))


def _corrupt(text: str, rng: random.Random) -> tuple[bytes, set[int]]:
    """-> (the file's bytes, the 0-based indices of the lines that were corrupted or inserted)."""
    lines = text.splitlines(keepends=True)
    touched: set[int] = set()
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(1, len(lines))
        kind = rng.choice(["drop_tab", "extra_tab", "quote", "label", "bytes", "dup", "blank", "truncate"])
        line = lines[i]
        if kind == "drop_tab":
            lines[i] = line.replace("\t", " ", 1)
        elif kind == "extra_tab":
            lines[i] = line.replace("\t", "\t\t", 1)
        elif kind == "quote":
            lines[i] = line[:5] + '"' + line[5:]
        elif kind == "label":
            lines[i] = line.rstrip("\n").rsplit("\t", 1)[0] + "\t" + rng.choice(["9", "-1", "x", "nan", "1e9"]) + "\n"
        elif kind == "bytes":
            lines[i] = line[:3] + "\udcff" + line[3:]  # written as the byte 0xff below
        elif kind == "dup":
            lines.insert(i, line)
            touched = {j + (j >= i) for j in touched}
        elif kind == "blank":
            lines[i] = "\n"
        elif kind == "truncate":
            lines[i] = line[: rng.randrange(1, max(2, len(line)))] + "\n"
        touched.add(i)
    return "".join(lines).encode("utf-8", errors="surrogateescape"), touched


@pytest.mark.parametrize("name,task", [("ids-sst-dev.csv", "sst"), ("quora-dev.csv", "quora"),
                                       ("sts-dev.csv", "sts"), ("ids-cfimdb-dev.csv", "cfimdb")])
def test_fuzzed_real_files_fail_cleanly_or_load_every_good_row(data_dir, tmp_path, name, task):
    """Random corruptions of a real file (1-4 lines). Strict: loads or names file:line. With
    skip_bad_rows: every untouched row is read unchanged (whatever broke before it), the rows
    read are untouched rows or come from touched lines, and every data line is accounted for."""
    from mtbert.data.cs224n import DataError, read_cs224n
    from mtbert.data.tasks import TASKS
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    text = (data_dir / name).read_text()[:60000]
    text = text[: text.rfind("\n") + 1]
    clean_path = tmp_path / f"clean-{name}"
    clean_path.write_text(text)
    as_row = lambda e: (e.id, e.text_a, e.text_b, e.label)
    clean = [as_row(e) for e in read_cs224n(clean_path, TASKS[task])[0]]
    by_id, id_col = {r[0]: r for r in clean}, text.split("\n", 1)[0].split("\t").index("id")
    for trial in range(25):
        path = tmp_path / f"{trial}-{name}"
        raw, touched = _corrupt(text, rng)
        path.write_bytes(raw)
        ids = {line.decode().split("\t")[id_col] for i, line in enumerate(raw.split(b"\n"))
               if i and i not in touched and line.strip()}
        untouched = [by_id[i] for i in ids if i in by_id]  # (rows with an empty label are not in by_id)
        try:
            read_cs224n(path, TASKS[task])
        except DataError as e:
            assert f"{path}:" in str(e), f"seed {seed}: message must name the file and line: {e}"
        examples, report = read_cs224n(path, TASKS[task], skip_bad_rows=True)
        got = [as_row(e) for e in examples]
        lost = sorted(r[0] for r in set(untouched) - set(got))
        assert not lost, f"seed {seed} trial {trial}: {len(lost)} good rows lost, e.g. ids {lost[:3]}"
        assert len(set(got) - set(clean)) <= len(touched), f"seed {seed} trial {trial}: rows from nowhere"
        data_lines = [line for line in raw.split(b"\n")[1:] if line.strip()]
        assert report.rows + sum(report.skipped_bad.values()) + report.skipped_empty_label == len(data_lines), \
            f"seed {seed} trial {trial}: {report.summary()} does not account for {len(data_lines)} lines"


@pytest.mark.dist
@pytest.mark.parametrize("method", ["sum", "pcgrad"])
def test_deepspeed_nan_steps_are_skipped_counted_and_stop_the_run(launched, method):
    """ZeRO-2, NaN loss on rank 0 only (run in the ZeRO-2 launch group, tests/equivalence_design.py
    FAULTS): the engine (summed) or the all-reduced Gram (per task) skips the step on every rank,
    the step is counted, and persistent NaN stops the run with the last good checkpoint (issue:
    DeepSpeed steps were never counted as skipped)."""
    from equivalence_design import FAULTS
    faults = {f["name"]: f for f in FAULTS}
    result, run = launched(faults[f"nan-once-{method}"])
    assert result.code == 0, result.log[-3000:]
    train = [r for r in read_metrics(run) if r["split"] == "train"]
    assert sum(r["skipped"] for r in train) == 1
    assert all(torch.isfinite(v).all() for v in load_weights(run / "final").values())
    assert json.loads((run / "summary.json").read_text())["params_agree_across_ranks"] is True
    result, run = launched(faults[f"nan-always-{method}"])
    assert result.code == 3 and "3 steps in a row had a non-finite loss" in result.log, result.log[-3000:]
    assert not (run / "summary.json").exists()
    last = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    assert last == 4


def test_a_launched_run_leaves_after_teardown_without_interpreter_finalization(monkeypatch):
    """A rank aborted in gloo's teardown during finalization after its outputs were written (CI,
    2026-12-02; the FSDP2 helper 2 of 9 times, 2026-12-07): a process that joined a process group
    (several ranks, or DeepSpeed's group of one) leaves with os._exit after Reporter.close, with
    the run's exit code and the streams flushed; a run refused after the group exists too; a
    process without a group (a run in this process) returns as before."""
    from types import SimpleNamespace

    from mtbert import train
    events = []

    class Left(Exception):
        pass

    def fake_exit(code):
        events.append(("os._exit", code))
        raise Left

    for group, refused in ((True, False), (True, True), (False, False)):
        events.clear()
        run = None if refused else SimpleNamespace(reporter=SimpleNamespace(close=lambda: events.append(("close",))),
                                                   lock=None)
        monkeypatch.setattr(train, "train", lambda argv: (2, None) if refused else (75, run))  # e.g. a stop's code
        monkeypatch.setattr(train, "process_group_exists", lambda: group)
        monkeypatch.setattr(train, "destroy_process_group", lambda: events.append(("destroy",)))
        monkeypatch.setattr(os, "_exit", fake_exit)
        if group:
            with pytest.raises(Left):
                train.main([])
            assert events == ([("destroy",), ("os._exit", 2)] if refused else [("close",), ("os._exit", 75)])
        else:
            assert train.main([]) == 75 and events == [("close",)]
    monkeypatch.undo()
    # the streams are flushed before os._exit: buffered output to a pipe would be lost otherwise
    code = "import sys; print('written', end=''); from mtbert.training.process import leave; leave(3)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe: block-buffered
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 3 and done.stdout == "written", done.stderr[-2000:]


LAUNCHED = ["mtbert/train.py", "mtbert/bench/dist.py", "mtbert/training/multirun.py", *sorted(f"tests/helpers/{p.name}" for p in
                                                               (ROOT / "tests" / "helpers").glob("*.py"))]


@pytest.mark.parametrize("script", LAUNCHED)
def test_every_launched_script_leaves_through_process_leave(script):
    """Every script that torchrun or accelerate launch starts ends one way: process.leave (directly,
    or through mtbert.train.main, which calls it once a process group exists). A script that
    returns into interpreter finalization with a gloo group alive can abort after its work."""
    import ast
    tree = ast.parse((ROOT / script).read_text())
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(tree) if isinstance(n, ast.Call)}
    imports_train_main = any(isinstance(n, ast.ImportFrom) and n.module == "mtbert.train"
                             and any(a.name == "main" for a in n.names) for n in ast.walk(tree))
    own_main = script == "mtbert/train.py"
    assert "leave" in calls or ((imports_train_main or own_main) and "main" in calls), (
        f"{script} does not end through mtbert.training.process.leave")
