"""One optimizer step, for every method.

Two paths:
- **summed** (method sum/mean): the tasks' losses are added and back-propagated once, through
  the prepared (DDP / DeepSpeed) model, exactly as any Accelerate script does.
- **per-task** (pcgrad, gse): each task's loss is back-propagated on its own into row k of a
  flat [K, P] buffer (optim/gradients.py), the reducer makes the rows global, the aggregator
  turns their Gram matrix into update weights, and ``w @ G`` becomes the shared ``.grad``.
  The forward runs on the unwrapped module, so DDP never sees several backward passes.

fp16 in the per-task path uses ``LossScaler`` below rather than ``torch.amp.GradScaler``:
GradScaler unscales the optimizer's ``.grad`` tensors, but here the per-task gradients live in
buffer rows and must be unscaled *before* the dot products. A step whose Gram diagonal is
not finite (inf/NaN in some task gradient) is skipped; the Gram matrix is all-reduced, so
every rank takes the same decision.
"""

from __future__ import annotations

import contextlib
import math

import torch

from mtbert.methods.smart import smart_loss
from mtbert.optim.aggregators import conflict_stats, update_weights
from mtbert.optim.gradients import GradientBuffers, make_reducer


class LossScaler:
    """Dynamic loss scale: halve on overflow, double after ``growth_interval`` good steps."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good = scale, growth_interval, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good = self.scale / 2, 0
        else:
            self.good += 1
            if self.good % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, s):
        self.scale, self.good = s["scale"], s["good"]


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """The PCGrad order generator: identical on every rank for a given step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Stepper:
    def __init__(self, accelerator, model, optimizer, scheduler, cfg, tasks: list[str],
                 autocast=None, scaler: LossScaler | None = None):
        self.acc, self.model, self.opt, self.sched, self.cfg = accelerator, model, optimizer, scheduler, cfg
        self.net = accelerator.unwrap_model(model)  # the MultitaskModel itself
        self.autocast = autocast or accelerator.autocast
        self.scaler = scaler
        self.per_task = cfg.method.name not in ("sum", "mean")
        self.deepspeed = accelerator.distributed_type == "DEEPSPEED"
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        # The per-task path unscales and clips itself, so it steps the bare torch optimizer
        # (Accelerate's wrapper would unscale a second time under fp16).
        self.raw_opt = getattr(optimizer, "optimizer", optimizer) if self.per_task else optimizer
        if self.per_task:
            world = accelerator.num_processes
            self.buffers = GradientBuffers(self.net, tasks, world)
            self.reducer = make_reducer(cfg.method.reducer, world, accelerator.process_index)

    def _task_loss(self, model, task, batch, scale):
        with self.autocast():
            out = model(task, batch)
            loss = self.net.heads[task].loss(out, batch["labels"])
            if self.cfg.method.smart:
                m = self.cfg.method
                loss = loss + m.smart_weight * smart_loss(self.net, task, batch, out, m.smart_noise,
                                                          m.smart_step, m.smart_steps)
        return loss * scale

    def step(self, step: int, micro_batches: list[dict], phase) -> dict:
        """micro_batches: grad_accum dicts task -> batch. Returns stats (tensors; no host sync)."""
        if self.per_task:
            return self._per_task_step(step, micro_batches, phase)
        return self._summed_step(micro_batches, phase)

    def _finish(self, phase, stats):
        if phase.head_only:  # ARRP freeze: everything but the task's head keeps still
            head = {id(p) for p in self.net.heads[phase.tasks[0]].parameters()}
            for p in self.params:
                if id(p) not in head:
                    p.grad = None
        clip = self.cfg.train.grad_clip or math.inf
        with_grad = [p for p in self.params if p.grad is not None]
        if self.per_task:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, clip, foreach=True)
        else:
            # Under DeepSpeed the engine already clipped and stepped in backward; this returns its norm.
            norm = self.acc.clip_grad_norm_(with_grad, clip)
        norm = torch.as_tensor(float("nan") if norm is None else norm)
        stats["grad_norm"] = norm
        ok = self.deepspeed or bool(torch.isfinite(norm))  # the step's one host sync
        if ok:
            self.raw_opt.step()
        self.raw_opt.zero_grad(set_to_none=True)
        return ok

    def _deepspeed_apply(self, present, phase, stats) -> bool:
        """Hand the combined gradient to the DeepSpeed engine: backward of sum(p * g) has
        gradient g for every parameter p, so ZeRO partitions, averages (identical on every
        rank), clips and steps it like any gradient."""
        buf = self.buffers
        pairs = list(zip(buf.shared, buf.update_views))
        pairs += [(p, g) for t in present for p, g in zip(buf.private[t], buf.priv_views[t])]
        if phase.head_only:
            head = {id(p) for p in self.net.heads[phase.tasks[0]].parameters()}
            pairs = [(p, g) for p, g in pairs if id(p) in head]
        surrogate = torch.stack([(p * g).sum() for p, g in pairs]).sum()
        self.acc.backward(surrogate)  # engine.backward + engine.step
        norm = self.acc.clip_grad_norm_(self.params, self.cfg.train.grad_clip or math.inf)  # the engine's norm
        stats["grad_norm"] = torch.as_tensor(float("nan") if norm is None else norm)
        return True

    def _summed_step(self, micro_batches, phase):
        n = len(micro_batches)
        losses = {}
        for i, batches in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.acc.no_sync(self.model)
            with sync:
                parts = {t: self._task_loss(self.model, t, b, phase.loss_scale) for t, b in batches.items()}
                total = sum(parts.values())
                if self.cfg.method.name == "mean":
                    total = total / len(parts)
                self.acc.backward(total if self.deepspeed else total / n)  # DeepSpeed divides by its own GAS
            for t, v in parts.items():
                losses[t] = losses.get(t, 0) + v.detach() / n
        stats = {f"loss/{t}": v for t, v in losses.items()}
        stats["skipped"] = not self._finish(phase, stats)
        self.sched.step()
        return stats

    def _per_task_step(self, step, micro_batches, phase):
        present = list(micro_batches[0])
        buf, n = self.buffers, len(micro_batches)
        buf.start(present, attach=not self.deepspeed)
        scale = self.scaler.scale if self.scaler else 1.0
        losses = {}
        for batches in micro_batches:
            for t, b in batches.items():
                loss = self._task_loss(self.net, t, b, phase.loss_scale) / n
                if self.deepspeed:  # DeepSpeed's gradient hooks would take .grad: ask autograd directly
                    params = buf.shared + buf.private[t]
                    buf.accumulate(t, torch.autograd.grad(loss * scale, params, allow_unused=True))
                else:
                    buf.point_to(t)  # shared .grad now view row t of the flat buffer
                    (loss * scale).backward()
                losses[t] = losses.get(t, 0) + loss.detach()
        rows = buf.rows(present)
        private = [buf.priv_flat[t] for t in present]
        if self.scaler:  # unscale before any dot product
            rows.div_(scale)
            for f in private:
                f.div_(scale)
        gram, local_rows, moved = self.reducer.reduce(rows, private)
        stats = {f"loss/{t}": v for t, v in losses.items()}
        finite = bool(torch.isfinite(gram.diagonal()).all())  # identical on every rank
        if self.scaler:
            self.scaler.update(not finite)
        if not finite:
            self.raw_opt.zero_grad(set_to_none=True)
            stats["skipped"] = True
            self.sched.step()
            return stats
        gram_cpu = gram.cpu()
        updates = update_weights(self.cfg.method.name, gram_cpu, seeded_generator(self.cfg.train.seed, step),
                                 self.cfg.method.pcgrad_reduction)
        if self.cfg.method.conflict_stats and len(present) > 1:
            stats.update({f"conflict/{k}": v for k, v in conflict_stats(gram_cpu, updates[0]).items()})
        for w in updates:  # GSE makes two updates from the same gradients
            buf.set_update(w, local_rows)
            moved += self.reducer.finish(buf.update)
            if self.deepspeed:
                stats["skipped"] = not self._deepspeed_apply(present, phase, stats)
                break
            buf.attach_update()
            if w is not updates[-1]:
                keep = [(p, p.grad) for ps in buf.private.values() for p in ps]
                self._finish(phase, stats)
                for p, g in keep:  # the private grads serve the second update as well
                    p.grad = g
            else:
                stats["skipped"] = not self._finish(phase, stats)
        stats["comm_bytes"] = moved
        self.sched.step()
        return stats
