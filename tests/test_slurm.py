"""The sbatch scripts under a real Slurm (started by .ci/run from slurm/ci/start-slurm.sh):
a 3-trial sweep as a job array, the comparison over its trials, and the preemption path
(USR1 -> checkpoint -> requeue -> resume -> same final step count)."""

import json
import os
import re
import shutil
import subprocess
import sys
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


def wait_jobs(job: str, timeout: float) -> None:
    """Poll squeue (sbatch --wait notices completion late) until the job and its array tasks are gone."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still queued after {timeout}s: {job_state(job)}")
        time.sleep(1)


def env():
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def test_sweep_array_then_compare(tiny_ckpt, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(f"""name: tiny-sweep
base: ["--model.checkpoint={tiny_ckpt}", "--data.batch_size=8", "--train.epoch_steps=4", "--train.epochs=1", "--train.progress=false",
       "--data.max_eval=16", "--log.wandb=true"]
grid:
  method.name: [sum, pcgrad, gse]
""")
    root = tmp_path / "runs"
    out = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(root), "--submit",
                          "--accel-config", "accelerate_configs/cpu_1proc.yaml", "--", "--time=10",
                          f"--output={tmp_path}/slurm-%A_%a.out"],
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


def test_preempted_job_checkpoints_requeues_and_finishes(tiny_ckpt, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--time=15", f"--output={log}",
           "--export=ALL,ACCEL_CONFIG=accelerate_configs/cpu_1proc.yaml,NPROC=1", "slurm/train.sbatch",
           f"--model.checkpoint={tiny_ckpt}", "--data.batch_size=8", "--train.epoch_steps=400", "--train.epochs=1",
           "--train.progress=false", "--data.max_eval=16", f"--train.out_dir={run}"]
    job = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not [r for r in read_metrics(run) if r["split"] == "train"]:
        assert time.time() < deadline, f"training never started: {job_state(job)} {log.read_text()[-2000:] if log.exists() else ''}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_jobs(job, 600)
    text = log.read_text()
    assert job_state(job)[0] in ("COMPLETED", "GONE"), text[-3000:]
    assert "stop requested: checkpoint at step" in text, text[-3000:]
    assert "requeueing job" in text and "resumed from" in text, text[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 400
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 400, "resumed run must continue, not restart"
