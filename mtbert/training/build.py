"""What a run is built from: the model (from its checkpoint, limits checked), the data (read,
checked and tokenized once), and the optimizer and LR schedule made ready for the launch's engine
(Accelerate's DDP / DeepSpeed, or mtbert's FSDP2)."""

from __future__ import annotations

from pathlib import Path

import torch

from mtbert.config.schema import Config, HeadCfg
from mtbert.data.batching import load_split
from mtbert.data.tasks import build_specs
from mtbert.distributed.accelerator import configure_deepspeed
from mtbert.distributed.collectives import Collectives
from mtbert.distributed.engines.fsdp2 import ShardedTrainingState, marked, shard_model
from mtbert.model.bert import count_params, from_pretrained
from mtbert.model.heads import MultitaskModel
from mtbert.optim.loss_weighting import has_learnable_weights
from mtbert.report.reporter import Reporter
from mtbert.training import limits


def layer_depth(name: str, shared_layers: int) -> int | None:
    """Depth of an encoder parameter for layer-wise lr decay: embeddings 0, encoder layer i -> i + 1,
    per-task copy j of the top layers -> shared_layers + j + 1; None for heads (always the top)."""
    parts = name.split(".")
    if parts[:2] == ["encoder", "emb"]:
        return 0
    if parts[:2] == ["encoder", "layers"]:
        return int(parts[2]) + 1
    if parts[0] == "task_layers":
        return shared_layers + int(parts[2]) + 1
    return None


def param_groups(model, cfg):
    """AdamW groups: no decay for biases and LayerNorm weights; head_lr for task-specific parameters
    (heads, per-task layers); with train.layer_lr_decay = d < 1, a layer at depth l of L is scaled by
    d^(L + 1 - l) (Howard & Ruder 2018; Sun et al. 2019: lower layers hold general features, move them less)."""
    shared = len(model.encoder.layers)
    total = shared + (len(next(iter(model.task_layers.values()))) if model.task_layers is not None else 0)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "loss_log_vars":  # UW's log-variances: a rate of their own, no decay
            groups["uw"] = {"params": [p], "lr": cfg.method.uw_lr, "weight_decay": 0.0}
            continue
        own = name.startswith(("heads.", "task_layers."))
        decay = p.ndim > 1
        lr = (cfg.train.head_lr or cfg.train.lr) if own else cfg.train.lr
        depth = layer_depth(name, shared) if cfg.train.layer_lr_decay != 1.0 else None
        if depth is not None:
            lr *= cfg.train.layer_lr_decay ** (total + 1 - depth)
        key = (own, decay, depth)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": cfg.train.weight_decay if decay else 0.0})
        groups[key]["params"].append(p)
    return list(groups.values())


def build_model(cfg: Config, reporter: Reporter, world: int, device):
    """-> (MultitaskModel, checkpoint folder, task specs, sizes for summary.json)."""
    encoder, folder = from_pretrained(cfg.model.checkpoint, cfg.model.dropout)
    specs = build_specs(cfg)
    module = MultitaskModel(encoder, specs, {t: cfg.heads.get(t, HeadCfg()) for t in specs},
                            cfg.model.sharing, frozen=cfg.model.encoder == "frozen",
                            loss_log_vars=has_learnable_weights(cfg.method.name))
    if cfg.model.init_weights:
        from safetensors.torch import load_file
        weights = load_file(cfg.model.init_weights)
        if not hasattr(module, "loss_log_vars"):
            weights.pop("loss_log_vars", None)  # a UW run's weights, fine-tuned by another method
        module.load_state_dict(weights)
    limits.check_checkpoint(cfg, encoder.config, folder, {t: module.heads[t].kind for t in specs})
    n_params, n_train = count_params(module), count_params(module, trainable_only=True)
    # fp32 weights (4 B) of every parameter + grad and two AdamW moments (12 B) of trainable ones
    state_mb = (4 * n_params + 12 * n_train) / 2 ** 20
    reporter.print(f"model: {cfg.model.checkpoint} ({folder}), {n_params / 1e6:.1f}M params "
                   f"({n_train / 1e6:.1f}M trainable, ~{state_mb:.0f} MiB weights+grads+AdamW), sharing "
                   f"(frozen, shared, per-task) = {module.sharing}, {world} process(es) on {device}")
    sizes = {"params": n_params, "trainable_params": n_train, "train_state_mib": round(state_mb, 1)}
    return module, folder, specs, sizes


def load_data(cfg: Config, specs: dict, module: MultitaskModel, folder: Path, reporter: Reporter):
    """Every split read, checked and tokenized once -> (train, dev, test) dicts by task.
    Tasks outside train.train_tasks (per-task fine-tunes) are neither trained nor evaluated."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    limits.check_tokenizer(tokenizer, module.encoder.config, folder)
    splits = {"train": {}, "dev": {}, "test": {}}
    for t, spec in specs.items():
        if cfg.train.train_tasks and t not in cfg.train.train_tasks:
            continue
        for name, out in splits.items():
            out[t] = load_split(spec, name, cfg, tokenizer, module.heads[t].kind, reporter.print)
    return splits["train"], splits["dev"], splits["test"]


def prepare_training(accelerator, module, cfg: Config, total: int, coll: Collectives, reporter: Reporter):
    """The module, its optimizer and LR schedule, made ready for the launch's engine -> (model,
    optimizer, scheduler). Accelerate prepares them (DDP, DeepSpeed ZeRO), except under mtbert's
    FSDP2 (distributed/engines/fsdp2.py): the module is sharded before the optimizer sees its parameters, and
    both are checkpointed whole through ShardedTrainingState."""
    from transformers import get_scheduler
    fsdp2 = marked(accelerator)
    if fsdp2:
        module = shard_model(module, coll.device_mesh())
    # Fused AdamW: 5.2x faster than foreach on this CPU (18 vs 92 ms per step, mtbert.bench); not for
    # FSDP2's DTensor parameters.
    optimizer = torch.optim.AdamW(param_groups(module, cfg), lr=cfg.train.lr, fused=not fsdp2)
    sched_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.lr_schedule]
    scheduler = get_scheduler(sched_name, optimizer, int(cfg.train.warmup * total), total)
    if cfg.train.compile:  # dynamic shapes: one graph for every bucket length (mtbert.bench --parts compile)
        module.encoder = torch.compile(module.encoder, dynamic=True)
        reporter.print("train.compile: the encoder is compiled (torch.compile, dynamic shapes); the first steps "
                       "include the compilation")
    if fsdp2:
        accelerator.register_for_checkpointing(ShardedTrainingState(module, optimizer), scheduler)
        return module, optimizer, scheduler
    configure_deepspeed(accelerator, cfg)  # no-op without DeepSpeed
    return accelerator.prepare(module, optimizer, scheduler)
