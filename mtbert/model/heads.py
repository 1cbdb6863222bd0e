"""Pooling, task heads and the multitask model (one encoder, per-task heads and top layers).

Hard parameter sharing ``F<a>-S<b>-I<c>`` (seed "MOPS"): embeddings and the bottom ``a``
layers frozen, ``b`` layers shared, the top ``c`` layers copied per task from the checkpoint.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from mtbert.errors import ConfigError
from mtbert.model.bert import Bert


def parse_sharing(spec: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"F(\d+)-S(\d+)-I(\d+)", spec.strip())
    if not m:
        raise ValueError(f"{spec!r} is not of the form F<frozen>-S<shared>-I<individual>, e.g. F2-S2-I2")
    return tuple(int(x) for x in m.groups())


def pool(hidden, mask, how: str):
    """hidden [B, T, H], mask [B, T] (1 = token) -> [B, H]."""
    if how == "cls":
        return hidden[:, 0]
    m = mask[..., None].to(hidden.dtype)
    if how == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    raise ValueError(f"unknown pooling {how!r}")


def mlp(d_in: int, d_hidden: int, d_out: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Linear(d_in, d_out)
    if layers == 2:
        return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
    raise ValueError(f"head layers must be 1 or 2, got {layers}")


class TaskHead(nn.Module):
    """Maps pooled sentence vectors to a task output; owns the task's loss and prediction.

    Output: [B, C] logits (C > 2 classes), [B] one logit (binary), or [B] a value (regression).
    """

    def __init__(self, spec, cfg, hidden: int):
        super().__init__()
        self.kind = cfg.kind if cfg.kind != "auto" else spec.default_head
        self.loss_name = cfg.loss if cfg.loss != "auto" else spec.default_loss
        self.pooling = cfg.pooling
        self.weight = cfg.weight
        self.spec = spec
        self.regression = spec.kind == "pair_regression"
        if spec.kind == "single_classification" and self.kind != "linear":
            raise ConfigError(f"heads.{spec.name}.kind: single-sentence task needs `linear`, got {self.kind!r}")
        if spec.kind != "single_classification" and self.kind == "linear":
            raise ConfigError(f"heads.{spec.name}.kind: pair task needs bi, cos2d, cosine or cross")
        if self.loss_name == "cosine_embedding" and not (self.kind == "cosine" and self.regression):
            raise ConfigError(f"heads.{spec.name}.loss: cosine_embedding needs a regression task with kind=cosine")
        if self.regression != (self.loss_name in ("mse", "cosine_embedding")):
            raise ConfigError(f"heads.{spec.name}.loss: {self.loss_name!r} does not fit a {spec.kind} task")
        n_out = 1 if (self.regression or spec.num_labels == 2) else spec.num_labels
        if self.loss_name == "ce" and n_out == 1:
            n_out = 2  # binary task trained with 2-way cross-entropy
        if self.loss_name == "bce" and n_out != 1:
            raise ConfigError(f"heads.{spec.name}.loss: bce needs a binary task")
        self.n_out = n_out
        self.drop = nn.Dropout(cfg.dropout)
        d_in = {"linear": hidden, "cross": hidden, "bi": 4 * hidden, "cos2d": 2 * hidden + 1}.get(self.kind)
        if self.kind == "cosine":
            # regression: cos itself; classification: a learned affine map of cos to a logit
            self.affine = None if self.regression else nn.Linear(1, n_out)
        else:
            self.net = mlp(d_in, hidden, n_out, cfg.layers)

    def forward(self, u, v=None):
        if self.kind in ("linear", "cross"):
            feats = u
        elif self.kind == "bi":
            feats = torch.cat([u, v, (u - v).abs(), u * v], -1)
        elif self.kind == "cos2d":
            feats = torch.cat([u, v, F.cosine_similarity(u, v, dim=-1)[:, None]], -1)
        else:  # cosine
            cos = F.cosine_similarity(u, v, dim=-1)
            return cos if self.affine is None else self.affine(cos[:, None]).squeeze(-1)
        out = self.net(self.drop(feats))
        return out.squeeze(-1) if self.n_out == 1 else out

    def _unit(self, y):
        lo, hi = self.spec.label_range
        return (y - lo) / (hi - lo)

    def loss(self, out, y):
        """The task's weighted training loss (``weight`` x the loss below)."""
        return self.weight * self._loss(out, y)

    def _loss(self, out, y):
        out = out.float()
        if self.loss_name == "ce":
            return F.cross_entropy(out, y.long())
        if self.loss_name == "bce":
            return F.binary_cross_entropy_with_logits(out, y.float())
        if self.kind == "cosine" and self.regression:  # cos vs the label mapped to [0, 1]
            if self.loss_name == "cosine_embedding":
                target = self._unit(y) > 0.5
                return torch.where(target, 1 - out, out.clamp(min=0)).mean()
            return F.mse_loss(out, self._unit(y.float()))
        return F.mse_loss(out, y.float())

    def predict(self, out):
        """Output -> prediction in label units (class id, 0/1, or a value in the label range)."""
        if self.regression:
            if self.kind == "cosine":
                lo, hi = self.spec.label_range
                return lo + (hi - lo) * out.float()
            return out.float()
        if out.dim() == 2:
            return out.argmax(-1)
        return (out > 0).long()


LOG_VARS = "_loss_log_vars"  # the dict-form forward's extra output under UW (not a task name)


class MultitaskModel(nn.Module):
    """One shared encoder, optional per-task top layers, one head per task."""

    def __init__(self, encoder: Bert, specs: dict, head_cfgs: dict, sharing: str = "", frozen: bool = False,
                 loss_log_vars: bool = False):
        super().__init__()
        n_layers = len(encoder.layers)
        frozen_n, shared_n, own_n = parse_sharing(sharing) if sharing else (0, n_layers, 0)
        if frozen_n + shared_n + own_n != n_layers:
            raise ConfigError(f"model.sharing: {sharing} has {frozen_n + shared_n + own_n} layers, "
                             f"the checkpoint has {n_layers}")
        self.heads = nn.ModuleDict({name: TaskHead(spec, head_cfgs[name], encoder.config.hidden_size)
                                    for name, spec in specs.items()})
        # Per-task copies of the top layers, initialised from the checkpoint's layers.
        top = list(encoder.layers[n_layers - own_n:])
        self.task_layers = nn.ModuleDict({name: nn.ModuleList(copy.deepcopy(top)) for name in specs}) if own_n else None
        del encoder.layers[n_layers - own_n:]
        encoder.pooler = None  # unused by every head: a parameter no task touches must not exist
        self.encoder = encoder
        if frozen:
            encoder.requires_grad_(False)
        elif frozen_n:
            encoder.emb.requires_grad_(False)
            encoder.layers[:frozen_n].requires_grad_(False)
        self.sharing = (frozen_n, shared_n, own_n)
        if loss_log_vars:  # uncertainty weighting's learnable log sigma_k^2, one per task (optim/loss_weighting.py)
            self.loss_log_vars = nn.Parameter(torch.zeros(len(specs)))

    def encode(self, task, ids, mask, types=None, inputs_embeds=None):
        h = self.encoder(ids, mask, types, inputs_embeds)  # [B, T, H]
        if self.task_layers is not None:
            m = Bert.attention_mask(mask)
            for layer in self.task_layers[task]:
                h = layer(h, m)
        return pool(h, mask, self.heads[task].pooling)

    def forward(self, task, batch: dict | None = None, inputs_embeds: list | None = None, head_only: bool = False):
        """batch: a_ids/a_mask/a_types [B, T] (+ b_* for bi-encoder pairs) -> head output.
        ``task`` may be a dict task -> batch: then a dict task -> head output, from one call
        (what a DDP-wrapped model needs for several tasks before one backward), plus UW's
        ``loss_log_vars`` under ``LOG_VARS`` (ZeRO-3 gathers a parameter only inside a forward).
        head_only: the pooled sentence vectors [B, H] are constants (ARRP's head-only batches),
        so backward reaches the head alone."""
        if isinstance(task, dict):
            outs = {t: self.forward(t, b, head_only=head_only) for t, b in task.items()}
            if hasattr(self, "loss_log_vars"):  # read inside the forward, where sharded parameters are gathered
                outs[LOG_VARS] = self.loss_log_vars.view(-1)
            return outs
        emb = inputs_embeds or [None, None]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not head_only):
            u = self.encode(task, batch["a_ids"], batch["a_mask"], batch.get("a_types"), emb[0])
            v = self.encode(task, batch["b_ids"], batch["b_mask"], None, emb[1]) if "b_ids" in batch else None
        return self.heads[task](u, v)

    def task_parameter_names(self, task: str) -> list[str]:
        """Names of the parameters that belong to one task only (its head and own layers)."""
        prefixes = [f"heads.{task}."] + ([f"task_layers.{task}."] if self.task_layers is not None else [])
        return [n for n, p in self.named_parameters() if p.requires_grad and n.startswith(tuple(prefixes))]
