"""Sweep expansion, comparison table/plots/analysis, W&B offline tracking, the ensemble,
user-defined tasks (CS224N files and a Hugging Face dataset), the benchmark command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, read_metrics, run_main, tiny_args


def test_sweep_grid_and_random_expansion(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    from sweep import expand
    spec = {"name": "s", "base": ["--preset=pcgrad"], "grid": {"train.lr": [1e-5, 2e-5], "data.tasks": [["sst", "sts"]]},
            "random": {"n": 3, "params": {"train.warmup": {"uniform": [0.0, 0.2]}, "data.batch_size": [8, 16]}},
            "seed": 1}
    lines = expand(spec, tmp_path)
    assert len(lines) == 5
    assert "--train.lr=1e-05" in lines[0] and "--data.tasks=sst,sts" in lines[0]
    assert f"--train.out_dir={tmp_path}/s/trial_4" in lines[4] and "--log.group=s" in lines[4]
    assert expand(spec, tmp_path) == lines  # seeded
    import shlex

    from mtbert.config.cli import parse_args
    for line in lines:  # every line is a valid config
        parse_args(shlex.split(line))


def test_sweep_listed_trials_and_the_committed_specs_expand_to_valid_configs(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    import shlex

    from sweep import expand, load_spec

    from mtbert.config.cli import parse_args
    lines = expand({"name": "s", "grid": {"train.lr": [1e-5]}, "trials": [{"train.layer_lr_decay": 0.9}, {}]}, tmp_path)
    assert len(lines) == 3 and "--train.layer_lr_decay=0.9" in lines[1] and "layer_lr_decay" not in lines[2]
    with pytest.raises(ValueError, match="trials"):
        expand({"trials": {"train.lr": 1e-5}}, tmp_path)
    for spec in sorted((ROOT / "launch" / "sweeps").glob("*.yaml")):
        for line in expand(load_spec(spec), tmp_path):
            cfg = parse_args(shlex.split(line))
            assert cfg.train.out_dir.startswith(str(tmp_path)), (spec, line)  # a preset must not move the trial


def test_sweep_local_runs_each_trial_without_the_venv_on_path(tiny_ckpt, tmp_path):
    """`.venv/bin/python launch/sweep.py SPEC --local` from a shell where the venv is not activated:
    the trials start with this interpreter's accelerate (a bare `accelerate` was not found)."""
    import yaml
    spec = tmp_path / "s.yaml"
    base = [a for a in tiny_args(tiny_ckpt, tmp_path / "unused") if not a.startswith("--train.out_dir")]
    spec.write_text(yaml.safe_dump({"name": "s", "base": [*base, "--train.epoch_steps=1", "--train.predict_test=false"],
                                    "trials": [{"train.lr": 1e-3}, {"train.lr": 2e-3}]}))
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)}
    res = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(tmp_path / "runs"), "--local"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2/2 trials finished" in res.stdout
    for i, lr in enumerate((1e-3, 2e-3)):
        assert json.loads((tmp_path / "runs" / "s" / f"trial_{i}" / "config.json").read_text())["train"]["lr"] == lr
    # --trials: only the named ones; a trial that does not exist is refused before any run
    shutil.rmtree(tmp_path / "runs" / "s" / "trial_0")
    res = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(tmp_path / "runs"), "--local",
                          "--trials", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "1/1 trials finished" in res.stdout and "[trial 1]" not in res.stdout, res.stdout
    for bad in ("2", "x"):
        res = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(tmp_path / "runs"),
                              "--local", "--trials", bad], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2 and "--trials" in res.stderr and "the sweep has trials 0-1" in res.stderr


@pytest.fixture(scope="module")
def two_runs(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    runs = []
    for method in ("sum", "pcgrad"):
        run = root / method
        assert run_main(tiny_args(tiny_ckpt, run, f"--method.name={method}", "--data.tasks=sst,quora,sts,cfimdb")) == 0
        runs.append(run)
    return runs


def test_compare_table_plots_and_analysis(two_runs, tmp_path):
    from mtbert.report.compare import main
    out = tmp_path / "out"
    assert main([*map(str, two_runs), "--out", str(out), "--analysis"]) == 0
    table = (out / "table.md").read_text().splitlines()
    assert table[0].startswith("| rank | run | method | cfimdb acc | quora acc | sst acc | sts pearson | overall")
    from mtbert.methods.registry import METHODS  # labels are the registry's titles
    titles = {METHODS["sum"].title, METHODS["pcgrad"].title}
    assert len(table) == 4 and titles <= {row.split(" | ")[2] for row in table[2:]}
    for png in ("dev_curves.png", "final_scores.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = (two_runs[0] / "analysis" / "report.md").read_text()
    assert "Confusion matrix" in report and "Pearson r" in report and "Worst 8 dev examples" in report
    for task in ("sst", "quora", "sts", "cfimdb"):
        assert (two_runs[0] / "analysis" / f"{task}.png").exists()


def test_compare_names_a_bad_run_dir(tmp_path, capsys):
    from mtbert.report.compare import main
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_wandb_offline_run_is_written_and_grouped(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert run_main(tiny_args(tiny_ckpt, run, "--log.wandb=true", "--log.group=g1", "--log.tags=a,b",
                              "--method.name=pcgrad")) == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "no W&B event file"


def test_no_wandb_import_when_tracking_is_off(tiny_ckpt, tmp_path):
    code = ("import sys; sys.argv=['x']; from conftest import run_main, tiny_args; from pathlib import Path;"
            f"assert run_main(tiny_args(Path({str(tiny_ckpt)!r}), Path({str(tmp_path / 'r')!r}), "
            "'--train.epoch_steps=1')) == 0; assert 'wandb' not in sys.modules, 'wandb imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert res.returncode == 0, res.stderr[-2000:]


def test_ensemble_fine_tunes_each_task_and_writes_predictions(two_runs):
    from conftest import run_main as _  # noqa: F401  (resets Accelerate's state in run_ensemble)

    from mtbert.training.ensemble import run_ensemble
    summary = run_ensemble(two_runs[1], ["--train.epoch_steps=2", "--train.progress=false"])
    ens = two_runs[1] / "ensemble"
    assert set(summary["metrics"]) == {"sst", "quora", "sts", "cfimdb"}
    for task in ("sst", "quora", "sts", "cfimdb"):
        cfg = json.loads((ens / task / "config.json").read_text())
        assert cfg["train"]["train_tasks"] == [task] and cfg["model"]["init_weights"].endswith("model.safetensors")
        trained = {k.split("/")[1] for r in read_metrics(ens / task) if r["split"] == "train" for k in r if k.startswith("loss/")}
        assert trained == {task}
    names = sorted(p.name for p in (ens / "predictions").iterdir())
    assert names == sorted(["cfimdb-dev-output.csv", "cfimdb-test-output.csv", "para-dev-output.csv",
                            "sst-dev-output.csv", "sst-test-output.csv", "sts-dev-output.csv", "sts-test-output.csv",
                            "cfimdb-dev-gold.csv", "para-dev-gold.csv", "sst-dev-gold.csv", "sts-dev-gold.csv"])


def test_user_defined_task_from_files(tiny_ckpt, tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    rows = ["\tid\tq1\tq2\tdup"] + [f"{i}\tid{i}\twhat is {i}?\twhat is {i % 3}?\t{int(i % 3 == i)}" for i in range(40)]
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    (data / "dev.tsv").write_text("\n".join(rows[:17]) + "\n")
    run = tmp_path / "run"
    assert run_main(tiny_args(tiny_ckpt, run, "--data.tasks=sst,mine", "--task_defs.mine.kind=pair_classification",
                              f"--task_defs.mine.train={data / 'train.tsv'}", f"--task_defs.mine.dev={data / 'dev.tsv'}",
                              "--task_defs.mine.columns=text_a:q1,text_b:q2,label:dup",
                              "--method.name=pcgrad")) == 0
    dev = [r for r in read_metrics(run) if r["split"] == "dev"]
    assert "mine/acc" in dev[-1]
    assert (run / "predictions" / "mine-dev-output.csv").exists()


def test_hub_source_reads_a_dataset_with_column_mapping():
    import datasets

    from mtbert.config.cli import set_value
    from mtbert.config.schema import Config
    from mtbert.data.hub import read_hub
    from mtbert.data.tasks import build_specs
    cfg = Config()
    for k, v in {"data.tasks": "stsb", "task_defs.stsb.kind": "pair_regression", "task_defs.stsb.source": "hub",
                 "task_defs.stsb.hub_name": "glue", "task_defs.stsb.hub_config": "stsb", "task_defs.stsb.label_max": "5",
                 "task_defs.stsb.train": "train", "task_defs.stsb.dev": "validation",
                 "task_defs.stsb.columns": "id:idx,text_a:sentence1,text_b:sentence2,label:label"}.items():
        set_value(cfg, k, v)
    spec = build_specs(cfg)["stsb"]
    fake = datasets.Dataset.from_dict({"idx": [0, 1, 2], "sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"],
                                       "label": [4.2, -1, 1.0]})
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return fake
    examples, report = read_hub(spec, "validation", load_dataset=load_dataset)
    assert calls == [("glue", "stsb", "validation")]
    assert [e.id for e in examples] == ["0", "2"] and examples[0].label == 4.2 and report.skipped_empty_label == 1


def test_bench_quick_prints_ratios(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "mtbert.bench", "--quick", "--parts", "model,methods,padding,zero,fsdp2",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["part"] for r in rows} == {"model", "methods", "padding", "zero", "fsdp2"}
    zero = {r["config"]: r for r in rows if r["part"] in ("zero", "fsdp2")}
    assert set(zero) == {"zero2_sum", "zero2_pcgrad", "zero3_sum", "zero3_pcgrad", "fsdp2_sum", "fsdp2_pcgrad"}
    # ZeRO-3 PCGrad holds this rank's partitions only: K rows + update + the engine's, each ~P/N
    z3, K, P = zero["zero3_pcgrad"], zero["zero3_pcgrad"]["K"], zero["zero3_pcgrad"]["P"]
    assert z3["grad_buffer_bytes_per_rank"] <= (K + 2) * P * 4 / 2 < zero["zero2_pcgrad"]["grad_buffer_bytes_per_rank"]
    assert zero["fsdp2_pcgrad"]["grad_buffer_bytes_per_rank"] <= (K + 2) * P * 4 / 2
    assert all(r["speedup_vs_hf"] > 0 for r in rows if r["part"] == "model")
    from mtbert.bench.parts import FAMILY
    assert {r["method"] for r in rows if r["part"] == "methods"} >= {"sum", "pcgrad", "gse", "smart", *FAMILY}
    assert "[methods]" in res.stdout and "vs_sum=" in res.stdout
    # every ratio with its spread over >= 5 paired rounds; the machine's clock and the data in meta
    for r in (r for r in rows if r["part"] == "methods"):
        assert r["vs_sum_lo"] <= r["vs_sum"] <= r["vs_sum_hi"] and r["repeats"] >= 5
    meta = json.loads(out.read_text())["meta"]
    assert meta["cpu_mhz_start"] and meta["data"].startswith("packaged sample")


def _fake_bin(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("setup,gpus,want", [("zero2", None, "2"), ("zero1", 3, "3"), ("zero3", None, "2"),
                                             ("ddp", 3, "3"), ("ddp", None, None)])
def test_train_sh_counts_gpus_and_falls_back_without_nvidia_smi(tmp_path, setup, gpus, want):
    """Before: without nvidia-smi the GPU-count pipeline failed under pipefail: exit 127, no message."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "accelerate", 'echo "accelerate $*"')
    if gpus:
        _fake_bin(bin_dir, "nvidia-smi", f'for i in $(seq 0 {gpus - 1}); do echo "GPU $i: NVIDIA H100 (UUID: x)"; done')
    # PATH without any real nvidia-smi: the fake bin first, then only the basics
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    res = subprocess.run(["bash", str(ROOT / "launch" / "train.sh"), setup, "--train.lr=1e-5"], env=env,
                         capture_output=True, text=True, timeout=30)
    if want is None:
        assert res.returncode == 2 and "no GPUs found for 'ddp'" in res.stderr and "NPROC" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert f"--num_processes {want} mtbert/train.py --train.lr=1e-5" in res.stdout, res.stdout
        assert f"accelerate_configs/{setup}.yaml" in res.stdout


def test_sweep_submit_passes_the_sweep_file_as_an_argument(tmp_path):
    """A user's --export after -- replaces sbatch's own: the sweep file must not travel in one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    _fake_bin(bin_dir, "sbatch", f'printf "%s\\n" "$@" > {record}; echo 123')
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\ngrid:\n  train.lr: [1.0e-5, 2.0e-5]\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(tmp_path / "runs"), "--submit",
                          "--accel-config", "accelerate_configs/cpu_1proc.yaml", "--",
                          "--export=ALL,NPROC=1", "--time=10"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "submitted array job 123" in res.stdout, res.stderr
    argv = record.read_text().splitlines()
    script = argv.index("slurm/sweep.sbatch")
    assert argv[script + 1:] == [str((tmp_path / "runs" / "s" / "sweep.txt").resolve()),
                                 "accelerate_configs/cpu_1proc.yaml"]
    assert "--export=ALL,NPROC=1" in argv[:script] and not any("SWEEP_FILE" in a for a in argv[:script])
    assert "--array=0-1" in argv[:script]
    res = subprocess.run([sys.executable, "launch/sweep.py", str(spec), "--root", str(tmp_path / "runs"), "--submit",
                          "--trials", "1"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "--array=1" in record.read_text().splitlines(), res.stderr


def test_wandb_is_refused_before_any_work_without_a_login(tmp_path, monkeypatch):
    from mtbert.config.schema import LogCfg
    from mtbert.errors import ConfigError
    from mtbert.report.reporter import check_wandb_ready
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # none there
    check_wandb_ready(LogCfg(wandb=False))  # off: nothing to check
    with pytest.raises(ConfigError, match=r"log\.wandb: no W&B login for api\.wandb\.ai: run `wandb login`"):
        check_wandb_ready(LogCfg(wandb=True))
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    check_wandb_ready(LogCfg(wandb=True))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    with pytest.raises(ConfigError, match="wandb.example.org"):
        check_wandb_ready(LogCfg(wandb=True))
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_wandb_ready(LogCfg(wandb=True))


def test_wandb_without_login_exits_2_before_loading_anything(tiny_ckpt, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "none")
    res = subprocess.run([sys.executable, "mtbert/train.py", *tiny_args(tiny_ckpt, tmp_path / "run"), "--log.wandb=true"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "log.wandb: no W&B login" in res.stderr and "Traceback" not in res.stderr
    assert "model:" not in res.stdout and not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [["-m", "mtbert.report.analysis"], ["-m", "mtbert.compare"], ["launch/sweep.py"],
                                    ["launch/compare_methods.py"]])
def test_tools_print_help_and_name_a_bad_path(tmp_path, module):
    res = subprocess.run([sys.executable, *module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr
    if module[-1] in ("mtbert.report.analysis", "mtbert.compare", "launch/sweep.py"):
        bad = tmp_path / "nope"
        res = subprocess.run([sys.executable, *module, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr, res.stderr
