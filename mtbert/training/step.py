"""One optimizer step, for every method.

Contract: N ranks with per-rank batch b take the same step as 1 process with batch N b. A step
is ``grad_accum`` micro-batches; each holds, per planned task, this rank's share of the global
batch (``MicroBatch``) and the factor ``share = n_local * N / n_global`` that makes the mean of
the ranks' (averaged) gradients the gradient of the global mean loss, also when a task's
examples are split unevenly (union schedule) or a rank got none of them.

Two paths:
- **summed** (sum, mean and the loss weightings rlw, uw, dwa, famo: optim/loss_weighting.py):
  the tasks' losses are combined and back-propagated once, through the prepared (DDP /
  DeepSpeed) model, exactly as any Accelerate script does.
- **per-task** (pcgrad, gse, mgda, cagrad, imtl_g, aligned_mtl, upgrad, dualproj, nash_mtl,
  gradvac: optim/aggregators/): each task's loss is back-propagated on its own into row k of a
  flat [K, P] buffer (optim/gradients.py), the reducer makes the rows global, the aggregator
  turns their (block) Gram matrices into update weights, and ``w @ G`` becomes the shared
  ``.grad``. The forward runs on the unwrapped module, so DDP never sees several backward passes.
Stateful methods (gradvac, nash_mtl, dwa, famo) keep ``Stepper.method_state``: float64 tensors
over the run's tasks, updated from all-reduced values only (identical on every rank) and saved
in every checkpoint (resume.py).

fp16 in the per-task path uses ``optim/loss_scaler.LossScaler`` (rows are unscaled before the
dot products). A step whose Gram diagonal is not finite (inf/NaN in some task gradient) is
skipped; the Gram matrix is all-reduced, so every rank takes the same decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from mtbert.config.schema import per_task
from mtbert.distributed.collectives import Collectives
from mtbert.distributed.engines import make_engine
from mtbert.methods.smart import smart_loss
from mtbert.model.heads import LOG_VARS
from mtbert.optim import aggregators, loss_weighting
from mtbert.optim.aggregators import GramInputs, conflict_stats
from mtbert.optim.loss_scaler import LossScaler
from mtbert.optim.loss_weighting import LOSS_WEIGHTINGS, WeightingInputs

if TYPE_CHECKING:  # annotations only: accelerate is imported by the caller
    from accelerate import Accelerator

    from mtbert.config.schema import Config


@dataclass
class MicroBatch:
    """One accumulation round of a step on this rank.

    batches: task -> this rank's padded batch of the task.
    shares: task -> n_local * world / n_global (1.0 whenever examples are split evenly). A rank
    that holds none of a planned task's examples (union schedule) runs one of them with share
    0: every rank then produces gradients for the same parameters, which DDP and ZeRO reduce
    in lockstep (a parameter with a gradient on one rank only would hang or crash them)."""

    batches: dict[str, dict | None]
    shares: dict[str, float]


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """The PCGrad order generator: identical on every rank for a given step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Stepper:
    """The method: per-step losses, per-task gradients, reduction, weights; the engine
    (engines/) hands the result to the optimizer."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, cfg: Config, tasks: list[str], collectives: Collectives | None = None,
                 autocast: Callable | None = None, scaler: LossScaler | None = None):
        collectives = collectives or Collectives(accelerator.num_processes, accelerator.device,
                                                 rank=accelerator.process_index)
        self.accelerator, self.model, self.cfg, self.collectives = accelerator, model, cfg, collectives
        self.module = accelerator.unwrap_model(model)  # the MultitaskModel itself
        self.autocast = autocast or accelerator.autocast
        self.scaler = scaler
        self.per_task = per_task(cfg.method.name)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.engine = make_engine(accelerator, model, optimizer, scheduler, self.params, cfg, self.per_task)
        self.tasks = list(tasks)
        # Per-task forwards: on the module itself (DDP must not see K backward passes), except
        # with sharded parameters (ZeRO-3, FSDP2), whose forward hooks gather them.
        self.task_model = self.model if self.engine.forward_through_wrapper else self.module
        self.column_state = None  # per-coordinate state of a coordinate-wise method, made at its first step
        self.columns = None  # [n] global coordinates of this rank's columns (coordinate-wise methods): fixed for the run
        if self.per_task:  # the engine knows where per-task gradients live (full rows or partitions)
            self.buffers = self.engine.make_buffers(self.module, tasks, collectives.world, cfg.method.gram_blocks)
            self.reducer = self.engine.make_reducer(cfg.method.reducer, collectives, len(tasks))
            self.method_state = aggregators.initial_state(cfg.method.name, len(tasks), len(self.buffers.blocks))
        else:
            self.method_state = loss_weighting.initial_state(cfg.method.name, len(tasks))

    def _task_loss(self, task, batch, out, share, phase, noise_seed):
        """share x loss scale x (task loss [+ SMART]) for head output ``out``."""
        with self.autocast():
            loss = self.module.heads[task].loss(out, batch["labels"])
            if self.cfg.method.smart:
                m = self.cfg.method
                loss = loss + m.smart_weight * smart_loss(self.module, task, batch, out, m.smart_noise, m.smart_step,
                                                          m.smart_steps, noise_seed, phase.head_only)
        return loss * (share * phase.loss_scale)

    def _noise_seed(self, step: int, micro: int, task: str) -> int:
        """SMART's perturbation seed: per (seed, step, micro-batch, task); smart.py adds the
        example index, so the noise of an example does not depend on which rank holds it."""
        return ((self.cfg.train.seed * 1_000_003 + step) * 64 + micro) * 64 + self.tasks.index(task)

    def step(self, step: int, micro_batches: list[MicroBatch | dict], phase) -> dict:
        """Returns stats (tensors; no host sync beyond the engine's one). A plain dict
        task -> batch is a MicroBatch with every share 1 (one process, or even shards)."""
        micro_batches = [mb if isinstance(mb, MicroBatch) else MicroBatch(mb, dict.fromkeys(mb, 1.0))
                         for mb in micro_batches]
        if self.per_task:
            return self._per_task_step(step, micro_batches, phase)
        return self._summed_step(step, micro_batches, phase)

    def _summed_step(self, step, micro_batches, phase):
        n, spec = len(micro_batches), LOSS_WEIGHTINGS[self.cfg.method.name]
        scale = self.scaler.scale if self.scaler else 1.0  # fp16: the engine scales and unscales
        generator = seeded_generator(self.cfg.train.seed, step)  # RLW's draws: the same on every rank
        losses = {}
        for i, mb in enumerate(micro_batches):
            # One call of the wrapped model for all tasks: DDP with find_unused_parameters
            # marks a parameter ready once per forward, so a second forward before the
            # backward would mark the first task's parameters twice.
            with self.autocast():
                outs = self.model(mb.batches, head_only=phase.head_only)
            log_vars = outs.pop(LOG_VARS, None)  # UW's [K] log-variances, from inside the forward
            if log_vars is not None and phase.head_only:  # only the head trains (ARRP): on every engine
                log_vars = log_vars.detach()
            parts = {t: self._task_loss(t, b, outs[t], mb.shares[t], phase, self._noise_seed(step, i, t))
                     for t, b in mb.batches.items()}
            names = [t for t in self.tasks if t in parts]  # the run's task order, on every rank
            inputs = WeightingInputs(self._task_index(names), generator, self.cfg.method,
                                     lambda: self._global_losses([parts[t].detach() for t in names]), log_vars)
            total = spec.combine([parts[t] for t in names], inputs, self.method_state)
            self.engine.backward(total / n, last=i == n - 1, scale=scale)
            for t, v in parts.items():
                losses[t] = losses.get(t, 0) + v.detach() / n
        stats = {f"loss/{t}": v for t, v in losses.items()}
        self.engine.clear_frozen(self._head_only(phase))
        stats["grad_norm"], applied = self.engine.step(per_task=False, scale=scale)
        stats["skipped"] = not applied
        if self.scaler:  # a non-finite global norm (identical on every rank): halve the scale
            stats["loss_scale"] = scale
            self.scaler.update(not applied)
        if spec.after_step and applied:
            names = [t for t in self.tasks if t in losses]
            after = self._losses_after_update(micro_batches, phase, names) if spec.reevaluate else None
            spec.after_step(self.method_state, self._task_index(names),
                            self._global_losses([losses[t] for t in names]), after, self.cfg.method)
        return stats

    def _task_index(self, names: list[str]) -> torch.Tensor:
        return torch.tensor([self.tasks.index(t) for t in names], dtype=torch.long)

    def _global_losses(self, values: list[torch.Tensor]) -> torch.Tensor:
        """This rank's share-weighted task losses -> the global batch's ([k] float64, host):
        their mean over ranks (one all-reduce of k floats on the run device)."""
        flat = torch.stack([v.float().reshape(()) for v in values]).to(self.collectives.device)
        self.collectives.all_reduce_mean_(flat)
        return flat.double().cpu()

    @torch.no_grad()
    def _losses_after_update(self, micro_batches, phase, names: list[str]) -> torch.Tensor:
        """The same micro-batches' global task losses after the update (FAMO's delta)."""
        n, total = len(micro_batches), dict.fromkeys(names, 0.0)
        for mb in micro_batches:
            with self.autocast():
                outs = self.module(mb.batches, head_only=phase.head_only)
                for t, b in mb.batches.items():  # (outs may hold LOG_VARS too: not a task)
                    loss = self.module.heads[t].loss(outs[t], b["labels"]) * (mb.shares[t] * phase.loss_scale)
                    total[t] = total[t] + loss.detach() / n
        return self._global_losses([torch.as_tensor(total[t]) for t in names])

    def _head_only(self, phase) -> list | None:
        """The parameters that train in ARRP's head-only batches (None: all of them)."""
        return list(self.module.heads[phase.tasks[0]].parameters()) if phase.head_only else None

    def _per_task_step(self, step, micro_batches, phase):
        """Per-task rows -> reducer -> Gram -> weights -> update(s) through the engine."""
        # Every task planned in any micro-batch is in the step, in the run's task order: the
        # plan is global, so every rank zeroes, reduces and combines the same rows.
        planned = {t for mb in micro_batches for t in mb.batches}
        present = [t for t in self.tasks if t in planned]
        losses = self._per_task_gradients(step, micro_batches, phase, present)
        self.reducer.wait()  # the rows' reductions, launched as each task finished its backward
        rows = self.buffers.rows(present)  # [k, P_pad]
        idx = [self.buffers.tasks.index(t) for t in present]
        gram, local_rows, blocks, moved = self.reducer.reduce(rows, [self.buffers.priv_flat[t] for t in present],
                                                              self.buffers.blocks, idx)  # gram: [L, k, k]
        stats = {f"loss/{t}": v for t, v in losses.items()}
        stats["comm_bytes"] = moved
        finite = bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all())  # identical on every rank
        if self.scaler:
            stats["loss_scale"] = self.scaler.scale
            if not finite:
                self.scaler.update(True)
        if not finite:
            self.engine.skip()
            stats["skipped"], stats["grad_norm"] = True, torch.tensor(float("nan"))
            return stats
        gram_cpu = gram.cpu()  # [L, k, k] float64
        name = self.cfg.method.name
        inputs = GramInputs(gram_cpu, self._task_index(present), seeded_generator(self.cfg.train.seed, step),
                            self.cfg.method, lambda: self._global_losses([losses[t] for t in present]))
        if aggregators.is_coordinate_wise(name):  # TrimmedMean, GradDrop, ...: on the columns where they lie
            if self.columns is None:  # made once: an arange over every shared parameter, not per step
                self.columns = self.reducer.local_columns(self.buffers.coordinates(self.collectives.rank,
                                                                                   self.collectives.world))
            coords = self.columns
            if self.column_state is None:  # [K, n] beside this rank's columns (ExcessMTL, MoCo, DB-MTL)
                self.column_state = aggregators.initial_column_state(name, len(self.tasks), local_rows.shape[1],
                                                                     local_rows)
            inputs.column_state, inputs.sum_partials = self.column_state, self.reducer.sum_partials
            updates = [aggregators.combine_columns(name, local_rows, coords, inputs, self.method_state)]  # [[n]]
        else:
            updates = aggregators.aggregate(name, inputs, self.method_state)  # each [L, k]
            if self.cfg.method.conflict_stats and len(present) > 1:
                stats.update({f"conflict/{k}": v for k, v in conflict_stats(gram_cpu, updates[0]).items()})
        for j, w in enumerate(updates):  # GSE makes two updates from the same gradients
            if aggregators.is_coordinate_wise(name):
                self.buffers.set_update_values(w)
            else:
                self.buffers.set_update(w, local_rows, blocks)
            stats["comm_bytes"] += self.reducer.finish(self.buffers.update)
            stats["grad_norm"], applied = self.engine.apply_update(self.buffers, present, self._head_only(phase),
                                                                   last=j == len(updates) - 1)
            stats["skipped"] = not applied
        if self.scaler:  # a head's gradient (not in the Gram) can overflow too: the global norm says so
            self.scaler.update(not applied)
        return stats

    def _per_task_gradients(self, step, micro_batches, phase, present) -> dict:
        """Each task's backward into its row (unscaled under fp16). -> task losses (detached)."""
        buf, n = self.buffers, len(micro_batches)
        buf.start(present, attach=self.engine.attach_rows)
        scale = self.scaler.scale if self.scaler else 1.0
        last = {t: i for i, mb in enumerate(micro_batches) for t in mb.batches}  # where each row is complete
        overlap = self.scaler is None  # fp16: rows are unscaled first (below), then reduced
        losses = {}
        for i, mb in enumerate(micro_batches):
            for t, b in mb.batches.items():
                with self.autocast():
                    out = self.task_model(t, b, head_only=phase.head_only)
                loss = self._task_loss(t, b, out, mb.shares[t], phase, self._noise_seed(step, i, t)) / n
                self.engine.task_backward(buf, t, loss * scale)
                losses[t] = losses.get(t, 0) + loss.detach()
                if overlap and i == last[t]:  # row t is final: reduce it while the next task computes
                    self._launch(t)
        if self.scaler:  # unscale before any dot product (rows() may be a copy: unscale G itself)
            for t in present:
                buf.G[buf.tasks.index(t)].div_(scale)
                buf.priv_flat[t].div_(scale)
                self._launch(t)
        return losses

    def _launch(self, task: str) -> None:
        k = self.buffers.tasks.index(task)
        self.reducer.launch(k, self.buffers.G[k], self.buffers.priv_flat[task])
