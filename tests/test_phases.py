"""The run as phases: a pure function of the config and the data sizes (fast)."""

from mtbert.config.cli import parse_args
from mtbert.methods.phases import build_phases, epoch_steps

BATCHES = {"sst": 10, "quora": 40, "sts": 6}


def test_epoch_steps_settings():
    assert epoch_steps("largest", BATCHES) == 40 and epoch_steps("smallest", BATCHES) == 6
    assert epoch_steps("sum", BATCHES) == 56 and epoch_steps("0.5*largest", BATCHES) == 20
    assert epoch_steps("7", BATCHES) == 7


def test_joint_training_is_one_phase_per_epoch_with_every_task():
    phases = build_phases(parse_args(["--train.epochs=3"]), BATCHES)
    assert [p.tasks for p in phases] == [("sst", "quora", "sts")] * 3
    assert [p.epoch for p in phases] == [1, 2, 3] and all(p.steps == 40 and p.eval_after for p in phases)


def test_sequential_trains_each_task_for_its_epochs_and_evaluates_after_each_task():
    phases = build_phases(parse_args(["--train.schedule=sequential", "--train.epochs=2"]), BATCHES)
    assert [(p.tasks, p.steps, p.eval_after) for p in phases] == [
        (("sst",), 10, False), (("sst",), 10, True), (("quora",), 40, False), (("quora",), 40, True),
        (("sts",), 6, False), (("sts",), 6, True)]


def test_pairwise_trains_the_three_pairs_in_turn():
    phases = build_phases(parse_args(["--method.pairwise=true", "--train.epoch_steps=9", "--train.epochs=1"]), BATCHES)
    assert [p.tasks for p in phases] == [("sst", "quora"), ("quora", "sts"), ("sts", "sst")]
    assert [p.steps for p in phases] == [3, 3, 3] and [p.eval_after for p in phases] == [False, False, True]


def test_arrp_adds_largest_task_batches_after_each_epoch():
    cfg = parse_args(["--preset=arrp", "--method.arrp_weight=0.5", "--train.epochs=2", "--train.epoch_steps=5"])
    phases = build_phases(cfg, BATCHES)
    assert [(p.tasks, p.steps) for p in phases] == [(("sst", "quora", "sts"), 5), (("quora",), 20)] * 2
    extra = phases[1]
    assert extra.loss_scale == 0.5 and extra.head_only and extra.epoch == 1
