"""Time-to-quality (mtbert/report/quality.py, `python -m mtbert.bench --quality`) on synthetic runs."""

import json
import subprocess
import sys

from conftest import ROOT

from mtbert.report.quality import first_reached
from mtbert.report.runs import load_run


def _run(folder, dev):
    folder.mkdir()
    lines = [{"step": s, "split": "dev", "time": t, "examples": s * 96, "overall": 0.0, "sst/acc": a, "sts/pearson": p}
             for s, t, a, p in dev]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return folder


def test_first_evaluation_at_or_above_each_target_and_all_together(tmp_path):
    # sst reaches 0.5 at step 10, falls back at 20, reaches again at 30; sts reaches 0.8 at step 20
    run = load_run(_run(tmp_path / "r", [(0, 5.0, 0.2, 0.1), (10, 60.0, 0.5, 0.7), (20, 120.0, 0.45, 0.81),
                                         (30, 180.0, 0.52, 0.79), (40, 240.0, 0.55, 0.85)]))
    hit = first_reached(run, {"sst": 0.5, "sts": 0.8, "quora": 0.9})
    assert hit["sst"]["step"] == 10 and hit["sst"]["time_s"] == 60.0 and hit["sst"]["examples"] == 960
    assert hit["sts"]["step"] == 20
    assert hit["all"]["step"] == 40, "both at once only at step 40 (sst fell back at 20, sts at 30)"
    assert "quora" not in hit  # the run has no quora metric


def test_the_command_prints_a_table_and_refuses_a_bad_target(tmp_path):
    run = _run(tmp_path / "r", [(0, 5.0, 0.2, 0.1), (10, 60.0, 0.3, 0.9)])
    ok = subprocess.run([sys.executable, "-m", "mtbert.bench", "--quality", str(run), "--targets", "sst=0.5,sts=0.8"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "not reached (best 0.300)" in ok.stdout and "60 s, 960 ex (step 10)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mtbert.bench", "--quality", str(run), "--targets", "sst"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--targets: 'sst' is not TASK=VALUE" in bad.stderr


def test_the_trainer_logs_the_examples_seen(tiny_ckpt, tmp_path):
    from conftest import read_metrics, run_main, tiny_args
    assert run_main(tiny_args(tiny_ckpt, tmp_path / "run", "--train.grad_accum=2")) == 0
    records = read_metrics(tmp_path / "run")
    train = [r for r in records if r["split"] == "train"]
    # round-robin: every step takes a batch of 8 from each of the 3 tasks, twice (grad_accum)
    assert [r["examples"] for r in train] == [r["step"] * 3 * 8 * 2 for r in train]
    assert [r["examples"] for r in records if r["split"] == "dev"] == [0, train[-1]["examples"]]
