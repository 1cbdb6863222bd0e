"""How a step's gradient reaches the optimizer, per engine. The step (step.py) computes
losses, per-task gradients and weights; an engine does the backward of a summed loss, takes a
combined gradient, clips, steps, and reports the pre-clip norm and whether the step applied.

- ``TorchEngine``: one process or DDP (Accelerate-prepared torch optimizer).
- ``DeepSpeedEngine``: ZeRO-1/2. mtbert owns gradient accumulation: DeepSpeed is configured
  with ``gradient_accumulation_steps=1`` and told where the boundary is
  (``set_gradient_accumulation_boundary``), so it steps once per mtbert step and never
  rescales a loss by its own accumulation count. A combined gradient is handed over through
  a surrogate backward of ``sum(p * g)`` (gradient g for every p), which ZeRO partitions,
  averages (identical on every rank), clips and steps like any gradient.

Parameters that got no gradient in a step (an absent task's head, an ARRP-frozen encoder):
``idle="keep"`` leaves ``grad=None`` so AdamW skips them; ``idle="step"`` gives them a zero
gradient so AdamW still applies moment decay and weight decay — what DeepSpeed's flat ZeRO
optimizers always do, so it is the only setting there (accelerator.py enforces it).
"""

from __future__ import annotations

import contextlib
import math

import torch


class TorchEngine:
    def __init__(self, accelerator, model, optimizer, scheduler, params: list, clip: float, idle: str,
                 per_task: bool):
        self.accelerator, self.model, self.sched, self.params = accelerator, model, scheduler, params
        self.clip, self.idle = clip or math.inf, idle
        # The per-task path unscales and clips itself, so it steps the bare torch optimizer
        # (Accelerate's wrapper would unscale a second time under fp16).
        self.opt = getattr(optimizer, "optimizer", optimizer) if per_task else optimizer

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """One micro-batch of the summed path; DDP all-reduces only on the last one."""
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
        with sync:
            self.accelerator.backward(loss)

    def step(self, per_task: bool, schedule: bool = True) -> tuple[torch.Tensor, bool]:
        """Clip, step unless the norm is not finite, zero; the LR scheduler steps once per
        mtbert step (``schedule=False`` for GSE's first update). -> (pre-clip norm, applied)."""
        if self.idle == "step":  # ("auto" outside a launch = keep)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        with_grad = [p for p in self.params if p.grad is not None]
        if per_task:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.clip, foreach=True)
        else:
            norm = self.accelerator.clip_grad_norm_(with_grad, self.clip)
        norm = torch.as_tensor(float("nan") if norm is None else norm)
        applied = bool(torch.isfinite(norm))  # the step's one host sync
        # fp16 on the summed path: Accelerate's GradScaler unscaled the gradients in the clip
        # above; it must see every step (it skips a non-finite one itself and lowers its scale),
        # else its next unscale_ raises "already been called since the last update()".
        scaled = not per_task and getattr(self.accelerator, "scaler", None) is not None
        if applied or scaled:
            self.opt.step()
            applied = applied and not (scaled and self.opt.step_was_skipped)
        self.opt.zero_grad(set_to_none=True)
        if schedule:
            self.sched.step()
        return norm, applied

    def skip(self) -> None:
        """A step skipped before the optimizer (non-finite per-task Gram): the schedule moves on."""
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    # -- the per-task path ------------------------------------------------------------------
    attach_rows = True  # shared .grad view the rows: backward accumulates straight into them

    def task_backward(self, buffers, task: str, loss: torch.Tensor) -> None:
        """Task ``task``'s gradient into its row (and its private buffer)."""
        buffers.point_to(task)  # shared .grad now view row ``task`` of the flat buffer
        loss.backward()

    def apply_update(self, buffers, present: list[str], head_only: list | None, last: bool):
        """Step with ``buffers.update`` (shared) and the present tasks' private gradients.
        head_only: the only parameters that train (ARRP's head-only batches). -> (norm, applied)."""
        buffers.attach_update()
        # GSE's first update: clipping scales .grad in place, and the private .grad are the
        # buffers themselves, so the second update gets copies of the unclipped ones.
        keep = [] if last else [(p, None if p.grad is None else p.grad.clone())
                                for ps in buffers.private.values() for p in ps]
        self.clear_frozen(head_only)
        norm, applied = self.step(per_task=True, schedule=last)
        for p, g in keep:
            p.grad = g
        return norm, applied

    def clear_frozen(self, head_only: list | None) -> None:
        """Everything but ``head_only`` has no gradient (its .grad may hold zeros from views)."""
        if head_only is not None:
            keep = {id(p) for p in head_only}
            for p in self.params:
                if id(p) not in keep:
                    p.grad = None


class DeepSpeedEngine:
    def __init__(self, accelerator, model, optimizer, scheduler, params: list, clip: float, idle: str,
                 per_task: bool):
        self.engine = accelerator.deepspeed_engine_wrapped.engine
        # Accelerate hands DeepSpeed only its own scheduler classes; ours (a LambdaLR) stays
        # outside the engine, so we step it once per mtbert step, applied or skipped alike.
        assert self.engine.lr_scheduler is None, "mtbert steps its LR scheduler itself"
        self.sched, self.params = scheduler, params

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self, per_task: bool, schedule: bool = True) -> tuple[torch.Tensor, bool]:
        """Clipping and the optimizer step happen inside ``engine.step`` (ZeRO clips on its
        partitions and skips a step whose norm is not finite). -> (pre-clip norm, applied)."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None or not applied else float(norm))
        if schedule:
            self.sched.step()
        return norm, applied

    def hand_over(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], schedule: bool = True):
        """Give the engine gradient g for each (parameter, g) and step. -> (norm, applied)."""
        self.engine.set_gradient_accumulation_boundary(True)
        surrogate = torch.stack([(p * g.to(p.dtype)).float().sum() for p, g in pairs]).sum()
        self.engine.backward(surrogate)
        return self.step(per_task=True, schedule=schedule)

    def skip(self) -> None:
        self.engine.zero_grad()
        self.sched.step()

    # -- the per-task path ------------------------------------------------------------------
    attach_rows = False  # DeepSpeed's gradient hooks would take .grad: rows are filled from autograd.grad

    def task_backward(self, buffers, task: str, loss: torch.Tensor) -> None:
        params = buffers.shared + buffers.private[task]
        buffers.accumulate(task, torch.autograd.grad(loss, params, allow_unused=True))

    def apply_update(self, buffers, present: list[str], head_only: list | None, last: bool):
        """Hand ``buffers.update`` and the present tasks' private gradients to the engine (under
        ARRP's head-only batches the head's alone: ZeRO steps the rest with a zero gradient)."""
        pairs = list(zip(buffers.shared, buffers.update_views))
        pairs += [(p, g) for t in present for p, g in zip(buffers.private[t], buffers.priv_views[t])]
        if head_only is not None:
            keep = {id(p) for p in head_only}
            pairs = [(p, g) for p, g in pairs if id(p) in keep]
        return self.hand_over(pairs, schedule=last)

    def clear_frozen(self, head_only: list | None) -> None:
        """Nothing to clear: the head-only forward gave the rest no gradient, and ZeRO steps
        every parameter anyway (train.idle_params=step)."""


def make_engine(accelerator, model, optimizer, scheduler, params, cfg, per_task: bool):
    cls = DeepSpeedEngine if accelerator.distributed_type == "DEEPSPEED" else TorchEngine
    return cls(accelerator, model, optimizer, scheduler, params, cfg.train.grad_clip, cfg.train.idle_params, per_task)
