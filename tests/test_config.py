"""The config parser and validation, without a model (fast)."""

import json

import pytest

from mtbert.config.cli import parse_args
from mtbert.config.schema import to_dict
from mtbert.errors import ConfigError


def test_dotted_overrides_take_each_fields_type():
    cfg = parse_args(["--train.lr=3e-5", "--train.grad_accum=2", "--method.smart=yes", "--data.tasks=sst,sts",
                      "--heads.sts.kind=bi", "--heads.sts.weight=5"])
    assert cfg.train.lr == 3e-5 and cfg.train.grad_accum == 2 and cfg.method.smart is True
    assert cfg.data.tasks == ["sst", "sts"] and cfg.heads["sts"].kind == "bi" and cfg.heads["sts"].weight == 5.0


def test_presets_apply_first_and_the_users_overrides_win():
    cfg = parse_args(["--preset=a_pcgrad", "--train.schedule=round_robin"])
    assert cfg.method.name == "pcgrad" and cfg.train.schedule == "round_robin"


def test_a_config_file_is_read_and_overridden(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"lr": 1e-4, "epochs": 7}, "method": {"name": "gse"}}))
    cfg = parse_args([f"--config={f}", "--train.epochs=2"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.method.name) == (1e-4, 2, "gse")
    again = tmp_path / "again.json"  # a run's config.json reproduces the run
    again.write_text(json.dumps(to_dict(cfg)))
    assert to_dict(parse_args([f"--config={again}"])) == to_dict(cfg)


@pytest.mark.parametrize("args,field", [
    (["--train.lrr=1"], "train.lrr"),                      # unknown key (with a suggestion)
    (["--train.lr=fast"], "train.lr"),                     # wrong type
    (["--train.schedule=random"], "train.schedule"),       # not a choice
    (["--train.idle_params=never"], "train.idle_params"),
    (["--train.grad_accum=0"], "train.grad_accum"),
    (["--method.arrp_batches=3", "--train.schedule=union"], "method.arrp_batches"),
    (["--method.pairwise=true", "--train.schedule=annealed"], "method.pairwise"),
    (["--method.name=pcgrad", "--data.tasks=sst"], "method.name"),
    (["--heads.nope.kind=bi"], "heads.nope"),
    (["--preset=nope"], "--preset"),
    (["--method.name=mgda", "--data.tasks=sst"], "method.name"),
    (["--method.name=sum", "--method.gram_blocks=layer"], "method.gram_blocks"),
    (["--method.name=nash_mtl", "--method.gram_blocks=layer"], "method.gram_blocks"),
    (["--method.name=famo", "--method.smart=true"], "method.smart"),
    (["--method.name=cagrad", "--method.cagrad_c=-1"], "method.cagrad_c"),
    (["--method.name=cagrad", "--method.cagrad_rescale=3"], "method.cagrad_rescale"),
    (["--method.name=gradvac", "--method.gradvac_beta=0"], "method.gradvac_beta"),
    (["--method.name=dwa", "--method.dwa_window=0"], "method.dwa_window"),
    (["--method.name=dwa", "--method.dwa_temperature=0"], "method.dwa_temperature"),
    (["--method.name=famo", "--method.famo_lr=0"], "method.famo_lr"),
    (["--method.name=uw", "--method.uw_lr=-1"], "method.uw_lr"),
    (["--method.name=mtl"], "method.name"),
    (["--train.layer_lr_decay=0"], "train.layer_lr_decay"),
    (["--train.layer_lr_decay=1.5"], "train.layer_lr_decay"),
])
def test_errors_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_args(args)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="grad_accum"):
        parse_args(["--train.grad_acum=2"])


@pytest.mark.parametrize("sharing", ["", "F0-S1-I1"])
def test_layer_lr_decay_gives_each_depth_its_rate(tiny_ckpt, sharing):
    """Tiny checkpoint, L = 2 layers, d = 0.5: embeddings lr/8, layer 0 lr/4, layer 1 lr/2 (as a
    per-task layer head_lr/2), heads head_lr; every parameter in exactly one group; d = 1: the groups
    and rates of before (per-task layers at head_lr)."""
    from mtbert.config.schema import HeadCfg
    from mtbert.data.tasks import build_specs
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.training.build import param_groups
    args = [f"--model.checkpoint={tiny_ckpt}", "--train.lr=1e-3", "--train.head_lr=5e-3", "--train.layer_lr_decay=0.5"]
    cfg = parse_args(args + ([f"--model.sharing={sharing}"] if sharing else []))
    encoder, _ = from_pretrained(cfg.model.checkpoint, -1)
    specs = build_specs(cfg)
    model = MultitaskModel(encoder, specs, {t: HeadCfg() for t in specs}, cfg.model.sharing)
    rate = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(rate) == len(named)
    want = {"encoder.emb.word.weight": 1e-3 / 8, "heads.sst.net.weight": 5e-3}
    if sharing:
        want |= {"encoder.layers.0.qkv.weight": 1e-3 / 4, "task_layers.sts.0.qkv.weight": 5e-3 / 2}
    else:
        want |= {"encoder.layers.0.qkv.weight": 1e-3 / 4, "encoder.layers.1.qkv.bias": 1e-3 / 2}
    for name, lr in want.items():
        assert rate[id(named[name])] == pytest.approx(lr), name
    flat = param_groups(model, parse_args([a for a in args if "layer_lr_decay" not in a] +
                                          ([f"--model.sharing={sharing}"] if sharing else [])))
    assert len(flat) == 4  # (own, weight decay) as before the field existed
    rate = {id(p): g["lr"] for g in flat for p in g["params"]}
    assert rate[id(named["encoder.emb.word.weight"])] == 1e-3 and rate[id(named["heads.sst.net.weight"])] == 5e-3
    if sharing:
        assert rate[id(named["task_layers.sts.0.qkv.weight"])] == 5e-3
