"""Full tiny runs through the real trainer: every output file, every method, resume, config errors."""

import json
import math
import re

import pytest
import torch
from conftest import read_metrics, run_main, tiny_args

PRED_FILES = {"sst-dev-output.csv": "Predicted_Sentiment", "sst-test-output.csv": "Predicted_Sentiment",
              "para-dev-output.csv": "Predicted_Is_Paraphrase", "sts-dev-output.csv": "Predicted_Similiary",
              "sts-test-output.csv": "Predicted_Similiary", "cfimdb-dev-output.csv": "Predicted_Sentiment",
              "cfimdb-test-output.csv": "Predicted_Sentiment"}


def _check_prediction_files(out, max_eval: int) -> None:
    """Every prediction file: the header, then one row per row of the split it predicts, with that
    split's ids in the file's order (the dev split cut to data.max_eval), and a prediction in the
    task's label space."""
    from mtbert.config.cli import load_file
    from mtbert.config.schema import Config
    from mtbert.data.batching import task_file
    from mtbert.data.cs224n import read_cs224n
    from mtbert.data.tasks import build_specs
    cfg = Config()
    load_file(cfg, str(out / "config.json"))
    specs = {spec.pred_name: spec for spec in build_specs(cfg).values()}
    for name, header in PRED_FILES.items():
        lines = (out / "predictions" / name).read_text().splitlines()
        assert lines[0] == f"id \t {header} "
        spec, split = specs[name.split("-")[0]], "dev" if "-dev-" in name else "test"
        source, _ = read_cs224n(task_file(spec, split, cfg), spec, labeled=split == "dev")
        want_ids = [e.id for e in source][:max_eval if split == "dev" else None]
        rows = [line.split(" , ") for line in lines[1:]]
        assert [ident for ident, _ in rows] == want_ids, f"{name}: ids differ from {split} split's"
        for _, pred in rows:
            value = float(pred)
            if spec.kind == "pair_regression":
                assert re.fullmatch(r"-?\d+\.\d{4} ", pred) and math.isfinite(value)  # (unclamped: Pearson)
            else:
                assert value == int(value) and 0 <= value < spec.num_labels, f"{name}: {pred!r}"
        if split == "dev":  # the gold labels beside it (mtbert.compare's paired tests)
            gold = (out / "predictions" / name.replace("-output", "-gold")).read_text().splitlines()
            assert gold[0] == f"id \t Gold_{spec.name} "
            got = [(i, float(v)) for i, v in (line.split(" , ") for line in gold[1:])]
            assert got == [(e.id, pytest.approx(float(e.label), abs=1e-4)) for e in source][:max_eval]


def test_full_tiny_run_writes_every_output(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    assert run_main(tiny_args(tiny_ckpt, out, "--data.tasks=sst,quora,sts,cfimdb", "--train.epochs=2")) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["tasks"] == ["sst", "quora", "sts", "cfimdb"] and cfg["train"]["epochs"] == 2
    records = read_metrics(out)
    train = [r for r in records if r["split"] == "train"]
    dev = [r for r in records if r["split"] == "dev"]
    assert train and all({"step", "epoch", "examples_per_s", "loss/sst", "loss/sts"} <= set(r) for r in train)
    assert [r["step"] for r in dev] == [0, 4, 8]
    assert all({"overall", "sst/acc", "quora/acc", "sts/pearson", "cfimdb/acc"} <= set(r) for r in dev)
    _check_prediction_files(out, max_eval=24)
    assert (out / "best" / "model.safetensors").exists()
    assert any(p.name.startswith("step_") for p in (out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8


METHODS = {
    "sum": [], "mean": ["--method.name=mean"], "pcgrad": ["--preset=pcgrad"], "gse": ["--preset=gse"],
    "rr_pcgrad": ["--preset=rr_pcgrad"], "arrp": ["--preset=arrp", "--method.arrp_batches=2"],
    "a_pcgrad": ["--preset=a_pcgrad", "--train.epochs=2"], "v_pcgrad": ["--preset=v_pcgrad"],
    "pairwise": ["--preset=pairwise", "--train.epoch_steps=6"],
    "pairwise_pcgrad": ["--preset=pairwise", "--method.name=pcgrad", "--train.epoch_steps=6"],
    "smart": ["--preset=smart"], "smart_pcgrad": ["--preset=smart", "--method.name=pcgrad"],
    "sequential": ["--preset=sequential"], "mops": ["--model.sharing=F1-S0-I1"],
    "frozen": ["--preset=frozen"], "proportional": ["--train.schedule=proportional"],
    "temperature": ["--train.schedule=temperature"], "grad_accum": ["--train.grad_accum=2", "--method.name=pcgrad"],
    "heads": ["--heads.quora.kind=cos2d", "--heads.sts.kind=bi", "--heads.sst.layers=2", "--heads.sst.pooling=cls",
              "--heads.quora.pooling=max"],
    "cross": ["--heads.quora.kind=cross", "--heads.sts.kind=cross"],
    "cosine_embedding": ["--heads.sts.loss=cosine_embedding"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_runs_end_to_end(tiny_ckpt, tmp_path, method):
    out = tmp_path / method
    assert run_main(tiny_args(tiny_ckpt, out, *METHODS[method])) == 0
    records = read_metrics(out)
    train = [r for r in records if r["split"] == "train"]
    assert train and all(r["skipped"] == 0 for r in train)
    losses = [v for r in train for k, v in r.items() if k.startswith("loss/")]
    assert losses and all(v == v and abs(v) < 1e6 for v in losses)  # finite
    if method in ("pcgrad", "gse", "rr_pcgrad", "v_pcgrad", "smart_pcgrad"):
        assert any("conflict/conflict_frac" in r for r in train)
    if method == "sequential":
        phases = [r["phase"] for r in records if r["split"] == "dev"]
        assert phases == ["start", "sst epoch 1", "quora epoch 1", "sts epoch 1"]
    assert (out / "predictions" / "sst-dev-output.csv").exists()


def test_frozen_and_sharing_freeze_what_they_say(tiny_ckpt):
    from mtbert.config.schema import HeadCfg
    from mtbert.data.tasks import TASKS
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    specs = {k: TASKS[k] for k in ("sst", "sts")}
    enc, _ = from_pretrained(str(tiny_ckpt))
    m = MultitaskModel(enc, specs, {k: HeadCfg() for k in specs}, "F1-S0-I1")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("encoder.emb", "encoder.layers.0")) for n in trainable)
    assert {"task_layers.sst.0.qkv.weight", "task_layers.sts.0.qkv.weight"} <= trainable
    assert len(m.encoder.layers) == 1
    torch.testing.assert_close(m.task_layers["sst"][0].qkv.weight, m.task_layers["sts"][0].qkv.weight)
    with pytest.raises(ValueError, match="has 3 layers, the checkpoint has 2"):
        MultitaskModel(from_pretrained(str(tiny_ckpt))[0], specs, {k: HeadCfg() for k in specs}, "F1-S1-I1")


@pytest.mark.parametrize("args,message", [
    (["--train.lrr=1"], "unknown config key 'train.lrr' \\(did you mean train.lr\\?\\)"),
    (["--train.lr=fast"], "train.lr: expected float"),
    (["--method.name=pcgrad", "--data.tasks=sst"], "method.name: needs at least two trained tasks"),
    (["--train.schedule=zigzag"], "train.schedule: 'zigzag' is not one of"),
    (["--data.tasks=sst,nope"], "data.tasks: unknown task 'nope'"),
    (["--model.sharing=F9"], "model.sharing: 'F9' is not of the form"),
    (["--heads.cfimdb.kind=bi"], "heads.cfimdb: 'cfimdb' is not in data.tasks"),
])
def test_bad_config_rejected_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert run_main([f"--train.out_dir={out}", *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (out / "metrics.jsonl").exists()


def _bad_inputs(tiny_ckpt, tmp_path):
    """(name, extra args, message) of errors found after parsing: checkpoint, heads, data, numbers."""
    not_bert = tmp_path / "not_bert"
    not_bert.mkdir()
    (not_bert / "config.json").write_text("{not json")
    data = tmp_path / "data"
    data.mkdir()
    from mtbert.data.batching import SAMPLE_DIR
    for f in SAMPLE_DIR.glob("sample_*.csv"):  # the sample under the course's names, one row broken
        name = f.name.removeprefix("sample_").replace("ids_", "ids-").replace("_", "-")
        (data / name).write_text(f.read_text())
    sts = data / "sts-train.csv"
    lines = sts.read_text().splitlines(keepends=True)
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tseven\n"
    sts.write_text("".join(lines))
    from conftest import make_tiny_checkpoint
    small_vocab = make_tiny_checkpoint(tmp_path / "small_vocab", vocab_size=1000)
    one_type = make_tiny_checkpoint(tmp_path / "one_type", type_vocab_size=1)
    return [
        ("missing checkpoint", [f"--model.checkpoint={tmp_path / 'nowhere'}"], "model.checkpoint: .*nowhere is not a checkpoint folder"),
        ("not a BERT", [f"--model.checkpoint={not_bert}"], "model.checkpoint: .*config.json: cannot read a BERT config"),
        ("head kind", ["--heads.sst.kind=bi"], "heads.sst.kind: single-sentence task needs `linear`"),
        ("sharing", ["--model.sharing=F1-S1-I1"], "model.sharing: F1-S1-I1 has 3 layers, the checkpoint has 2"),
        ("bad row", [f"--data.dir={data}"], f"{sts}:4: could not convert|{sts}:4: .*seven"),
        ("lr nan", ["--train.lr=nan"], "train.lr: must be a finite number"),
        ("temperature 0", ["--train.temperature=0"], "train.temperature: must be > 0"),
        ("max_eval < 0", ["--data.max_eval=-1"], "data.max_eval: must be >= 0"),
        ("init weights", [f"--model.init_weights={tmp_path / 'w.safetensors'}"], "model.init_weights: no such file"),
        # the limits a checkpoint and the data set (mtbert/training/limits.py), before any work
        ("max_length", ["--model.max_length=1000"], r"model.max_length: 1000 is more than the 128 positions of "),
        ("small vocab", [f"--model.checkpoint={small_vocab}"], r"model.checkpoint: the tokenizer in .*small_vocab has "
                                                                 r"30522 tokens, the model's embedding table 1000"),
        ("one token type", [f"--model.checkpoint={one_type}", "--heads.quora.kind=cross"],
         r"heads.quora.kind: a cross-encoder needs 2 token types .* type_vocab_size 1"),
        ("batch > rows", ["--data.max_train=4"], r"data.batch_size: a global batch of 8 \(8 x 1 process\(es\)\) is "
                                                 r"larger than task sst's 4 training examples \(data.max_train\)"),
        ("classes", ["--data.tasks=five", "--task_defs.five.kind=single_classification", "--task_defs.five.num_labels=3",
                     f"--task_defs.five.train={SAMPLE_DIR / 'sample_ids_sst_train.csv'}",
                     f"--task_defs.five.dev={SAMPLE_DIR / 'sample_ids_sst_dev.csv'}",
                     "--task_defs.five.columns=label:sentiment"],
         r"sample_ids_sst_train.csv:\d+: label '[34]' is not a class in 0..2"),
        ("columns", ["--data.tasks=five", "--task_defs.five.kind=single_classification",
                     f"--task_defs.five.train={SAMPLE_DIR / 'sample_ids_sst_train.csv'}",
                     f"--task_defs.five.dev={SAMPLE_DIR / 'sample_ids_sst_dev.csv'}", "--task_defs.five.columns=lbl"],
         r"task_defs.five.columns: bad column mapping 'lbl'"),
        ("no dev", ["--data.tasks=five", "--task_defs.five.kind=single_classification",
                    f"--task_defs.five.train={SAMPLE_DIR / 'sample_ids_sst_train.csv'}"],
         r"task_defs.five: set both train and dev"),
    ]


def test_bad_input_found_after_parsing_exits_2_with_one_line_and_no_traceback(tiny_ckpt, tmp_path, capsys):
    """Each bad input in this process (main returns 2, raises nothing, says one line naming the
    field or file:line, writes no metrics); then one of them through the real entry point (a
    subprocess): exit 2 and no traceback. Before, these ended in a traceback with exit 1."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    cases = _bad_inputs(tiny_ckpt, tmp_path)
    for name, extra, message in cases:
        run = tmp_path / f"run-{name.replace(' ', '_')}"
        assert run_main([*tiny_args(tiny_ckpt, run), *extra]) == 2, name
        err = capsys.readouterr().err
        assert re.search(message, err), f"{name}: {err[-1000:]}"
        assert not (run / "metrics.jsonl").exists(), name
    name, extra, message = next(c for c in cases if c[0] == "bad row")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "mtbert/train.py", *tiny_args(tiny_ckpt, tmp_path / "process"), *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, f"{name}: exit {res.returncode}\n{res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr, f"{name}: {res.stderr[-2000:]}"
    assert re.search(message, res.stderr), f"{name}: {res.stderr[-1000:]}"
