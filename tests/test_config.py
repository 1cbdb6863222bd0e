"""The config parser and validation, without a model (fast)."""

import json

import pytest

from mtbert.config import ConfigError, parse_args, to_dict


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
])
def test_errors_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_args(args)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="grad_accum"):
        parse_args(["--train.grad_acum=2"])
