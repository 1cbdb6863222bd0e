"""The torch engine: one process or DDP (an Accelerate-prepared torch optimizer)."""

from __future__ import annotations

import contextlib
import math

import torch

from mtbert.optim.gradients import GradientBuffers, make_reducer


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
    forward_through_wrapper = False  # per-task forwards run on the module itself (DDP sees none)

    def make_buffers(self, module, tasks: list[str], world: int, gram_blocks: str) -> GradientBuffers:
        return GradientBuffers(module, tasks, world, gram_blocks)

    def make_reducer(self, kind: str, collectives, K: int):
        return make_reducer(kind, collectives, K)

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
