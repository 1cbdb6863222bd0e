"""Impossible values and combinations of a Config, rejected before any work; each message
names the field (``train.lr``) and what is wrong (ConfigError: one line, exit 2)."""

from __future__ import annotations

import math
from pathlib import Path

from mtbert.config.schema import GRADIENT_METHODS, LOSS_METHODS, Config, flatten, per_task, to_dict
from mtbert.errors import ConfigError

CHOICES = {
    "model.encoder": {"finetune", "frozen"},
    "train.lr_schedule": {"linear", "cosine", "constant"},
    "train.precision": {"auto", "no", "bf16", "fp16"},
    "train.idle_params": {"auto", "keep", "step"},
    "train.schedule": {"round_robin", "proportional", "annealed", "temperature", "union", "sequential"},
    "method.name": {*LOSS_METHODS, *GRADIENT_METHODS},
    "method.gram_blocks": {"whole", "layer"},
    "method.cagrad_rescale": {0, 1, 2},
    "method.pcgrad_reduction": {"sum", "mean"},
    "method.reducer": {"allreduce", "sharded"},
    "method.arrp_freeze": {"none", "all_but_head"},
    "heads.*.kind": {"auto", "linear", "bi", "cos2d", "cosine", "cross"},
    "heads.*.pooling": {"cls", "mean", "max"},
    "heads.*.loss": {"auto", "ce", "bce", "mse", "cosine_embedding"},
    "task_defs.*.kind": {"single_classification", "pair_classification", "pair_regression"},
    "task_defs.*.source": {"cs224n", "hub"},
}



def validate(cfg: Config) -> None:
    """Reject impossible values and combinations before any work; messages name the field."""
    for key, value in flatten(to_dict(cfg)).items():
        _check_choice(key, value)
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every < / > check
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    _check_numbers(cfg)
    _check_tasks(cfg)
    _check_method(cfg)


def _check_choice(path: str, value) -> None:
    pattern = path if path in CHOICES else ".".join(p if j != 1 else "*" for j, p in enumerate(path.split(".")))
    allowed = CHOICES.get(pattern)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not one of {sorted(allowed)}")


def _check_numbers(cfg: Config) -> None:
    t, d, m = cfg.train, cfg.data, cfg.method
    positive = {"data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size,
                "train.epochs": t.epochs, "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "model.max_length": cfg.model.max_length, "train.keep_last": t.keep_last,
                "train.max_bad_steps": t.max_bad_steps}
    for path, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{path}: must be > 0, got {v}")
    for path, v in {"train.lr": t.lr, "train.head_lr": t.head_lr, "train.weight_decay": t.weight_decay,
                    "train.grad_clip": t.grad_clip, "train.max_steps": t.max_steps,
                    "train.eval_every": t.eval_every, "data.max_train": d.max_train,
                    "method.arrp_batches": m.arrp_batches, "method.smart_steps": m.smart_steps}.items():
        if v < 0:
            raise ConfigError(f"{path}: must be >= 0, got {v}")
    if t.lr == 0:
        raise ConfigError("train.lr: must be > 0")
    if not 0 < t.layer_lr_decay <= 1:
        raise ConfigError(f"train.layer_lr_decay: must be in (0, 1], got {t.layer_lr_decay}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1) (0 = no weight average), got {t.ema_decay}")
    for path, v in {"train.temperature": t.temperature, "method.smart_step": m.smart_step,
                    "method.smart_noise": m.smart_noise}.items():
        if v <= 0:
            raise ConfigError(f"{path}: must be > 0, got {v}")
    for path, v in {"data.max_eval": d.max_eval, "method.smart_weight": m.smart_weight,
                    "method.arrp_weight": m.arrp_weight}.items():
        if v < 0:
            raise ConfigError(f"{path}: must be >= 0, got {v}")
    if not (cfg.model.dropout == -1 or 0 <= cfg.model.dropout < 1):
        raise ConfigError(f"model.dropout: -1 (the checkpoint's) or in [0, 1), got {cfg.model.dropout}")
    if cfg.model.init_weights and not Path(cfg.model.init_weights).is_file():
        raise ConfigError(f"model.init_weights: no such file {cfg.model.init_weights}")
    if not 0 <= t.warmup < 1:
        raise ConfigError(f"train.warmup: a fraction in [0, 1), got {t.warmup}")
    factor, _, base = t.epoch_steps.rpartition("*")
    try:
        if base in ("smallest", "largest", "sum"):
            assert float(factor or 1) > 0
        else:
            assert int(t.epoch_steps) > 0
    except (ValueError, AssertionError):
        raise ConfigError(f"train.epoch_steps: `smallest`, `largest`, `sum`, a multiple like `2*largest`, "
                          f"or a positive integer, got {t.epoch_steps!r}") from None


def _check_tasks(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if not d.tasks:
        raise ConfigError("data.tasks: name at least one task")
    if len(set(d.tasks)) != len(d.tasks):
        raise ConfigError(f"data.tasks: a task is listed twice: {d.tasks}")
    from mtbert.data.tasks import TASKS  # local import: tasks.py imports this module
    for name in d.tasks:
        if name not in TASKS and name not in cfg.task_defs:
            raise ConfigError(f"data.tasks: unknown task {name!r}; built in: {', '.join(TASKS)}; "
                              f"or define it with --task_defs.{name}.kind=... ")
    for name, head in cfg.heads.items():
        if name not in d.tasks:
            raise ConfigError(f"heads.{name}: {name!r} is not in data.tasks {d.tasks}")
        if head.weight < 0 or head.layers not in (1, 2) or not 0 <= head.dropout < 1:
            raise ConfigError(f"heads.{name}: weight must be >= 0, layers 1 or 2, dropout in [0, 1); "
                              f"got weight={head.weight}, layers={head.layers}, dropout={head.dropout}")
    for name in t.train_tasks:
        if name not in d.tasks:
            raise ConfigError(f"train.train_tasks: {name!r} is not in data.tasks {d.tasks}")


def _check_method(cfg: Config) -> None:
    t, m = cfg.train, cfg.method
    trained = t.train_tasks or cfg.data.tasks
    multi = {"method.name": m.name not in ("sum", "mean"), "method.pairwise": m.pairwise,
             "method.arrp_batches": m.arrp_batches > 0}
    for path, on in multi.items():
        if on and len(trained) < 2:
            raise ConfigError(f"{path}: needs at least two trained tasks, got {trained}")
    if m.arrp_batches and t.schedule != "round_robin":
        raise ConfigError("method.arrp_batches: ARRP extends round-robin training; set train.schedule=round_robin")
    if m.pairwise and t.schedule != "round_robin":
        raise ConfigError("method.pairwise: pairs are trained round-robin; set train.schedule=round_robin")
    _check_method_family(cfg)
    if cfg.model.sharing:
        from mtbert.model.heads import parse_sharing
        try:
            parse_sharing(cfg.model.sharing)
        except ValueError as e:
            raise ConfigError(f"model.sharing: {e}") from None


def _check_method_family(cfg: Config) -> None:
    """Hyper-parameters of the gradient and loss-weighting methods, and their unproved combinations."""
    m = cfg.method
    if m.gram_blocks != "whole" and not per_task(m.name):
        raise ConfigError(f"method.gram_blocks={m.gram_blocks}: block Grams are for per-task methods "
                          f"({', '.join(GRADIENT_METHODS)}), not method.name={m.name}")
    if m.gram_blocks != "whole" and per_task(m.name):
        from mtbert.optim.aggregators import AGGREGATORS
        if not AGGREGATORS[m.name].blocks:
            raise ConfigError(f"method.gram_blocks: {m.name} solves one problem per step over all shared parameters "
                              f"(state or coordinates, not per block); use whole")
    if m.name == "cr_mogm":
        from mtbert.optim.aggregators import AGGREGATORS
        inner = [n for n, a in AGGREGATORS.items() if a.fn and not a.init_state and n not in ("gse", "cr_mogm")]
        if m.cr_mogm_inner not in inner:
            raise ConfigError(f"method.cr_mogm_inner: {m.cr_mogm_inner!r} is not a stateless per-task method; "
                              f"use one of {', '.join(inner)}")
    for path, v, ok in (("method.cagrad_c", m.cagrad_c, m.cagrad_c >= 0),
                        ("method.gradvac_beta", m.gradvac_beta, 0 < m.gradvac_beta <= 1),
                        ("method.dwa_temperature", m.dwa_temperature, m.dwa_temperature > 0),
                        ("method.dwa_window", m.dwa_window, m.dwa_window > 0),
                        ("method.famo_lr", m.famo_lr, m.famo_lr > 0), ("method.famo_decay", m.famo_decay, m.famo_decay >= 0),
                        ("method.fairgrad_alpha", m.fairgrad_alpha, m.fairgrad_alpha >= 0),
                        ("method.pcd_tau", m.pcd_tau, 0 <= m.pcd_tau <= 1),
                        ("method.sdmgrad_lambda", m.sdmgrad_lambda, m.sdmgrad_lambda >= 0),
                        ("method.modo_gamma", m.modo_gamma, m.modo_gamma > 0), ("method.modo_rho", m.modo_rho, m.modo_rho >= 0),
                        ("method.cr_mogm_alpha", m.cr_mogm_alpha, 0 <= m.cr_mogm_alpha <= 1),
                        ("method.gradnorm_alpha", m.gradnorm_alpha, m.gradnorm_alpha >= 0),
                        ("method.gradnorm_lr", m.gradnorm_lr, m.gradnorm_lr > 0),
                        ("method.krum_byzantine", m.krum_byzantine, m.krum_byzantine >= 0),
                        ("method.krum_selected", m.krum_selected, m.krum_selected >= 1),
                        ("method.trim", m.trim, m.trim >= 0),
                        ("method.excess_eta", m.excess_eta, m.excess_eta > 0),
                        ("method.moco_gamma", m.moco_gamma, m.moco_gamma > 0), ("method.moco_rho", m.moco_rho, m.moco_rho >= 0),
                        ("method.dbmtl_beta", m.dbmtl_beta, 0 <= m.dbmtl_beta < 1),
                        ("method.stch_mu", m.stch_mu, m.stch_mu > 0), ("method.stch_warmup", m.stch_warmup,
                                                                         m.stch_warmup >= 0),
                        ("method.uw_lr", m.uw_lr, m.uw_lr > 0)):
        if not ok:
            raise ConfigError(f"{path}: out of range, got {v} (see --help)")
    if m.name == "famo" and m.smart:
        raise ConfigError("method.smart: FAMO's loss-change update re-evaluates the plain task losses; "
                          "SMART's noise terms are not part of them (not supported together)")
