"""`python -m mtbert.compare` on synthetic run directories (3 seeds per method): seed groups,
mean ± CI, the paired test on the saved dev predictions, labels that name what differs."""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT

from mtbert.config.cli import parse_args
from mtbert.config.schema import to_dict
from mtbert.report.runs import load_run
from mtbert.report.seed_groups import group_runs

N = 300


def _write(path, header, ids, values, fmt):
    path.write_text(f"id \t {header} \n" + "".join(f"{i} , {fmt(v)} \n" for i, v in zip(ids, values)))


def make_run(folder, method, seed, quality, noise, lr=1e-4, rng=None, epochs=1):
    rng = rng or np.random.default_rng(seed)
    world = np.random.default_rng(123)  # the dev set: the same for every run
    ids = [f"ex{i}" for i in range(N)]
    gold, sts = world.integers(0, 5, N), world.uniform(0, 5, N)
    q = quality + 0.02 * rng.standard_normal()
    sst = np.where(rng.random(N) < q, gold, (gold + rng.integers(1, 5, N)) % 5)
    sts_pred = sts + noise * rng.standard_normal(N)
    acc, r = float((sst == gold).mean()), float(np.corrcoef(sts_pred, sts)[0, 1])
    (folder / "predictions").mkdir(parents=True)
    _write(folder / "predictions" / "sst-dev-output.csv", "Predicted_Sentiment", ids, sst, lambda v: str(int(v)))
    _write(folder / "predictions" / "sst-dev-gold.csv", "Gold_sst", ids, gold, lambda v: str(int(v)))
    _write(folder / "predictions" / "sts-dev-output.csv", "Predicted_Similiary", ids, sts_pred, lambda v: f"{v:.4f}")
    _write(folder / "predictions" / "sts-dev-gold.csv", "Gold_sts", ids, sts, lambda v: f"{v:.4f}")
    cfg = to_dict(parse_args([f"--method.name={method}", f"--train.seed={seed}", f"--train.lr={lr}",
                              f"--train.out_dir={folder}", f"--train.epochs={epochs}"]))
    (folder / "config.json").write_text(json.dumps(cfg))
    dev = {"step": 10, "split": "dev", "overall": (acc + (r + 1) / 2) / 2, "sst/acc": acc, "sts/pearson": r}
    (folder / "metrics.jsonl").write_text(json.dumps(dev) + "\n")
    return folder


def test_seed_groups_are_labelled_by_what_differs(tmp_path):
    runs = [load_run(make_run(tmp_path / f"trial_{i}", "sum", s, 0.5, 1.0, lr=lr))
            for i, (s, lr) in enumerate([(1, 1e-4), (2, 1e-4), (1, 3e-4), (2, 3e-4)])]
    runs.append(load_run(make_run(tmp_path / "trial_9", "pcgrad", 1, 0.5, 1.0, epochs=3)))
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 2, 1]
    # lr tells the sum groups apart; epochs differs only between methods (a budget): not named
    assert [g.label for g in groups] == ["sum (joint RR) (lr=0.0001)", "sum (joint RR) (lr=0.0003)",
                                         "PCGrad (RR-PCGrad) (lr=0.0001)"]


def test_a_run_from_before_a_new_field_groups_with_its_default(tmp_path):
    """config.json of a run made before train.layer_lr_decay existed lacks the field: it trained with
    the default, so it joins the seeds that have layer_lr_decay=1.0 and no label names the field."""
    old = make_run(tmp_path / "old", "sum", 1, 0.5, 1.0)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["train"]["layer_lr_decay"]
    (old / "config.json").write_text(json.dumps(cfg))
    groups = group_runs([load_run(old), load_run(make_run(tmp_path / "new", "sum", 2, 0.5, 1.0))])
    assert [(len(g.runs), g.label) for g in groups] == [(2, "sum (joint RR)")]


def test_compare_marks_the_real_difference_only(tmp_path):
    dirs = []
    for method, quality, noise in (("sum", 0.5, 1.0), ("pcgrad", 0.7, 1.0), ("mgda", 0.5, 1.0)):
        dirs += [make_run(tmp_path / f"{method}_{s}", method, s, quality, noise) for s in (1, 2, 3)]
    dirs.append(make_run(tmp_path / "gse_1", "gse", 1, 0.7, 1.0))  # as good as PCGrad, but one seed: untested
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, "-m", "mtbert.compare", *map(str, dirs), "--out", str(out),
                          "--rounds", "500"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in (out / "stats.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    assert "sum (joint RR) (reference)" in rows and "trial" not in (out / "stats.md").read_text()
    pc, mg = rows["PCGrad (RR-PCGrad)"], rows["MGDA"]
    assert pc.split(" | ")[1] == "3" and "±" in pc
    sst_col = 2  # group | n | sst acc | sts pearson | overall
    assert "**+**" in pc.split(" | ")[sst_col], pc
    assert "**" not in mg, mg
    assert rows["GSE"].split(" | ")[1] == "1" and "**" not in rows["GSE"], rows["GSE"]
    assert (out / "group_scores.png").stat().st_size > 0


def test_a_reference_that_is_not_there_exits_2(tmp_path):
    d = make_run(tmp_path / "r", "sum", 1, 0.5, 1.0)
    res = subprocess.run([sys.executable, "-m", "mtbert.compare", str(d), "--out", str(tmp_path / "c"),
                          "--reference", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "--reference: no group is 'nope'" in res.stderr


def test_a_wandb_group_gets_the_same_seed_groups_and_seed_level_test(tmp_path, monkeypatch, capsys):
    """--wandb-group ENTITY/PROJECT/GROUP: runs read through wandb.Api (faked here: no network)
    form the same seed groups; without prediction files the test is the seed level alone."""
    import types

    from mtbert.report import compare

    class FakeRun:
        def __init__(self, method, seed, sst, lr=1e-4):
            self.name = f"{method}-{seed}"
            self.config = to_dict(parse_args([f"--method.name={method}", f"--train.seed={seed}", f"--train.lr={lr}"]))
            self.summary = {"_step": 30, "_runtime": 60.0}
            sts = 0.80 + 0.001 * seed
            self.rows = [{"_step": 30, "dev/overall": (sst + (sts + 1) / 2) / 2, "dev/sst/acc": sst,
                          "dev/sts/pearson": sts}, {"_step": 31, "train/loss/sst": 1.0}]

        def scan_history(self):
            return iter(self.rows)

    runs = [FakeRun("sum", s, 0.40 + 0.005 * s) for s in (1, 2, 3)]
    runs += [FakeRun("pcgrad", s, 0.60 + 0.005 * s) for s in (1, 2, 3)]
    runs += [FakeRun("pcgrad", s, 0.40 + 0.005 * s, lr=3e-4) for s in (1, 2)]  # another setting: its own group
    asked = []

    class Api:
        def runs(self, path, filters):
            asked.append((path, filters))
            return runs
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    out = tmp_path / "cmp"
    assert compare.main(["--wandb-group", "me/mtbert/study", "--out", str(out), "--rounds", "200"]) == 0
    assert asked == [("me/mtbert", {"group": "study"})]
    rows = {line.split(" | ")[0].strip("| "): line for line in (out / "stats.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["sum (joint RR) (lr=0.0001) (reference)"].split(" | ")[1] == "3"
    pc, other = rows["PCGrad (RR-PCGrad) (lr=0.0001)"], rows["PCGrad (RR-PCGrad) (lr=0.0003)"]
    assert pc.split(" | ")[1] == "3" and "0.610 ±" in pc and "**+**" in pc.split(" | ")[2], pc
    assert other.split(" | ")[1] == "2" and "**" not in other, other
