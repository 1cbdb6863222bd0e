"""The sbatch scripts under a real Slurm (started by .ci/run from slurm/ci/start-slurm.sh):
a 3-trial sweep as a job array, the comparison over its trials, and the preemption path
(USR1 -> checkpoint -> requeue -> resume -> same final step count)."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, read_metrics

pytestmark = pytest.mark.slurm


def _slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(s in out for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not _slurm_up():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the Slurm tests: .ci/run starts Slurm with slurm/ci/start-slurm.sh")
        pytest.skip("no running Slurm (start one with: sudo bash slurm/ci/start-slurm.sh)")


def job_state(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\S+)", out)
    code = re.search(r"ExitCode=(\S+)", out)
    return (state.group(1) if state else "GONE"), (code.group(1) if code else "?")


def follow(job: str, timeout: float) -> str | None:
    """Poll squeue (sbatch --wait notices completion late) until the job and its array tasks are
    gone -> None, or what went wrong. Slurm holds a requeued job for ~2 minutes (reason
    BeginTime); it is released after 3 s (a start within the second of the requeue is refused:
    "Job credential revoked")."""
    deadline, held = time.time() + timeout, {}
    while queued := subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], capture_output=True,
                                   text=True).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            return f"job {job} still queued after {timeout}s: {job_state(job)}"
        for line in queued.splitlines():
            jid, state, reason = line.split()[:3]
            if state == "PENDING" and reason == "BeginTime":
                if time.time() - held.setdefault(jid, time.time()) > 3:
                    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
                    held.pop(jid)
        time.sleep(0.5)
    return None


def wait_jobs(job: str, timeout: float) -> None:
    if problem := follow(job, timeout):
        pytest.fail(problem)


def env():
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


class Preempted(threading.Thread):
    """One submitted job, preempted from the background: once ``ready()`` (training started, or a
    first checkpoint written) ``scancel <preempt>`` is sent, and the job is followed (requeue holds
    released) until it is gone. Every job of the module is submitted at once and runs beside the
    others (the CI node oversubscribes its cores: slurm/ci/start-slurm.sh), so the module waits for
    the slowest job instead of the sum of them; the tests then read what each job left."""

    def __init__(self, job: str, log: Path, preempt: list[str], ready):
        super().__init__(daemon=True)
        self.job, self.log, self.preempt, self.ready, self.problem = job, log, preempt, ready, None
        self.start()

    def run(self):
        deadline = time.time() + 300
        while not self.ready():
            if time.time() > deadline:
                self.problem = f"never ready to preempt: {job_state(self.job)} {self.text()[-3000:]}"
                subprocess.run(["scancel", self.job])
                return
            time.sleep(0.2)
        subprocess.run(["scancel", *self.preempt, self.job], check=True)
        self.problem = follow(self.job, 600)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def finished(self) -> str:
        """-> the job's output, once the job is gone (fails the test with what went wrong)."""
        self.join(timeout=1200)
        assert not self.is_alive(), f"job {self.job} still followed after 20 minutes"
        assert self.problem is None, self.problem
        return self.text()


SINGLE = {"usr1-to-batch-shell": ["--signal=USR1", "--batch"], "term-to-every-process": ["--signal=TERM", "--full"]}
MULTINODE = {"usr1-to-batch-shell": ["--signal=USR1", "--batch"], "term-to-every-step-process": ["--signal=TERM"],
             "term-to-every-process": ["--signal=TERM", "--full"]}


def submit(cmd: list[str]) -> str:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=True).stdout.strip()


def train_started(run: Path):
    return lambda: (run / "metrics.jsonl").exists() and any(r["split"] == "train" for r in read_metrics(run))


def checkpointed(run: Path):
    return lambda: bool(list((run / "checkpoints").glob("step_*")))


@pytest.fixture(scope="module")
def jobs(tiny_ckpt, tmp_path_factory):
    """Every preemption job of the module, submitted together and preempted in the background."""
    out = {}
    for name, preempt in SINGLE.items():
        folder = tmp_path_factory.mktemp(f"single-{name}")
        run, log = folder / "run", folder / "job.out"
        job = submit(["sbatch", "--parsable", "--time=15", f"--output={log}",
                      "--export=ALL,ACCEL_CONFIG=accelerate_configs/cpu_1proc.yaml,NPROC=1", "slurm/train.sbatch",
                      f"--model.checkpoint={tiny_ckpt}", "--data.batch_size=8", "--train.epoch_steps=200",
                      "--train.epochs=1", "--train.progress=false", "--data.max_eval=16", f"--train.out_dir={run}"])
        out[("single", name)] = (Preempted(job, log, preempt, train_started(run)), run)
    for name, preempt in MULTINODE.items():
        folder = tmp_path_factory.mktemp(f"multinode-{name}")
        run, log = folder / "run", folder / "job.out"
        job = submit(["sbatch", "--parsable", "--time=15", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                      "--cpus-per-task=1", f"--output={log}",
                      "--export=ALL,ACCEL_CONFIG=accelerate_configs/cpu_2proc.yaml,GPUS_PER_NODE=1",
                      "slurm/multinode.sbatch", *multinode_args(tiny_ckpt), f"--train.out_dir={run}"])
        # signalled mid-run, after the first checkpoint
        out[("multinode", name)] = (Preempted(job, log, preempt, checkpointed(run)), run)
    return out


def test_sweep_array_then_compare(tiny_ckpt, tmp_path, jobs, two_rank_reference):
    """(``jobs``, ``two_rank_reference``: the preemption jobs are submitted first and run beside this one.)"""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(f"""name: tiny-sweep
base: ["--model.checkpoint={tiny_ckpt}", "--data.batch_size=8", "--train.epoch_steps=4", "--train.epochs=1", "--train.progress=false",
       "--data.max_eval=16", "--log.wandb=true"]
grid:
  method.name: [sum, pcgrad, gse]
""")
    root = tmp_path / "runs"
    out = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(root), "--submit",
                          "--accel-config", "accelerate_configs/cpu_1proc.yaml", "--", "--time=10", "--cpus-per-task=1",
                          # a user's --export (as the README teaches) must not drop the sweep file
                          "--export=ALL,NPROC=1,MTBERT_SWEEP_TEST=1", f"--output={tmp_path}/slurm-%A_%a.out"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = re.search(r"submitted array job (\d+)", out.stdout).group(1)
    wait_jobs(job, 900)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    trials = sorted((root / "tiny-sweep").glob("trial_*"))
    assert len(trials) == 3, logs[-3000:]
    for trial in trials:
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["steps"] == 4, logs[-3000:]
        assert (trial / "predictions" / "sst-dev-output.csv").exists()
        assert list((trial / "wandb").glob("offline-run-*")), "W&B offline run not written"
    methods = {json.loads((t / "config.json").read_text())["method"]["name"] for t in trials}
    assert methods == {"sum", "pcgrad", "gse"}
    groups = {json.loads((t / "config.json").read_text())["log"]["group"] for t in trials}
    assert groups == {"tiny-sweep"}
    cmp_out = tmp_path / "compare"
    res = subprocess.run([sys.executable, "-m", "mtbert.compare", *map(str, trials), "--out", str(cmp_out),
                          "--analysis"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    table = (cmp_out / "table.md").read_text()
    from mtbert.methods.registry import METHODS  # the method column shows the registry's titles
    assert table.count("\n") == 5 and METHODS["pcgrad"].title in table and METHODS["gse"].title in table
    assert (cmp_out / "dev_curves.png").stat().st_size > 5000 and (cmp_out / "final_scores.png").exists()
    assert (trials[0] / "analysis" / "report.md").exists()


@pytest.mark.parametrize("name", SINGLE)
def test_preempted_job_checkpoints_requeues_and_finishes(jobs, name):
    """One node, no srun: the batch shell, the launcher and the rank all get the TERM of
    `--full`; the launcher ignores it, the rank checkpoints, the job is requeued."""
    follower, run = jobs[("single", name)]
    text = follower.finished()
    assert job_state(follower.job)[0] in ("COMPLETED", "GONE"), text[-3000:]
    assert "stop requested: checkpoint at step" in text, text[-3000:]
    assert "requeueing job" in text and "resumed from" in text, text[-3000:]
    assert "checkpoint written; requeueing job" in text, text[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 200
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 200, "resumed run must continue, not restart"


@pytest.fixture(scope="module")
def two_rank_reference(tiny_ckpt, tmp_path_factory):
    """The uninterrupted run the preempted multi-node jobs must reproduce (2 CPU ranks, one launch)."""
    from conftest import launch
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = launch("cpu_2proc.yaml", [*multinode_args(tiny_ckpt), f"--train.out_dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def multinode_args(tiny_ckpt) -> list[str]:
    return [f"--model.checkpoint={tiny_ckpt}", "--data.batch_size=4", "--train.epoch_steps=60", "--train.epochs=1",
            "--train.progress=false", "--data.max_eval=8", "--train.log_every=10", "--train.checkpoint_every=15",
            "--model.dropout=0.0", "--method.name=pcgrad"]


@pytest.mark.parametrize("name", MULTINODE)
def test_multinode_job_preempted_requeues_and_matches_an_uninterrupted_run(jobs, two_rank_reference, name):
    """slurm/multinode.sbatch with two srun tasks on the one node standing in for two nodes (each
    task one `accelerate launch` with its own machine rank, 1 CPU rank each), preempted by a stop
    request to the batch shell only, a TERM to every process of the steps (launchers and ranks of
    every node), or a TERM to every process of the job: srun then kills its step at once (Slurm
    does that for TERM), so that run is requeued to resume from its newest complete checkpoint.
    Every variant must be requeued and end with the uninterrupted run's final weights."""
    import torch
    from conftest import load_weights
    follower, run = jobs[("multinode", name)]
    preempt = follower.preempt
    text = follower.finished()
    assert "2 process(es)" in text and "restart 1" in text, text[-4000:]
    resumed = re.search(r"resumed from \S+/checkpoints/step_(\d+) at step (\d+)", text)
    assert resumed and int(resumed.group(1)) < 60, f"not resumed mid-run:\n{text[-4000:]}"
    if "--full" in preempt:
        assert "requeueing job" in text and "before the trainer confirmed a checkpoint" in text, text[-4000:]
    else:
        stopped = int(re.search(r"stop requested: checkpoint at step (\d+)", text).group(1))
        assert "checkpoint written; requeueing job" in text and int(resumed.group(1)) == stopped, text[-4000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 60
    want, got = load_weights(two_rank_reference / "final"), load_weights(run / "final")
    assert all(torch.equal(want[k], got[k]) for k in want), "the preempted run trained something else"
