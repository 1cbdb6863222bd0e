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
        # mtbert unscales and clips itself (fp16 included), so it steps the bare torch optimizer.
        self.opt = getattr(optimizer, "optimizer", optimizer)

    def backward(self, loss: torch.Tensor, last: bool, scale: float = 1.0) -> None:
        """One micro-batch of the summed path (``scale``: fp16's loss scale); DDP all-reduces
        only on the last one."""
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
        with sync:
            self.accelerator.backward(loss * scale if scale != 1.0 else loss)

    def step(self, per_task: bool, schedule: bool = True, scale: float = 1.0) -> tuple[torch.Tensor, bool]:
        """Unscale (fp16's summed path), clip, step unless the norm is not finite, zero; the LR
        scheduler steps once per mtbert step (``schedule=False`` for GSE's first update).
        -> (pre-clip norm, applied)."""
        if self.idle == "step":  # ("auto" outside a launch = keep)
            for p in self.params:
                if p.grad is None:
                    p.grad = self.zero_grad_like(p)
        with_grad = [p for p in self.params if p.grad is not None]
        if scale != 1.0 and with_grad:  # (the per-task path unscales its rows itself)
            self.unscale([p.grad for p in with_grad], scale)
        # the global norm: DDP's gradients are already averaged, so torch's is the same on every rank
        norm = self.global_norm(torch.nn.utils.clip_grad_norm_(with_grad, self.clip, foreach=True))
        applied = bool(torch.isfinite(norm))  # the step's one host sync
        if applied:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if schedule:
            self.sched.step()
        return norm, applied

    # What an engine's gradients need in ``step`` (FSDP2's are DTensor shards: Fsdp2Engine).
    def zero_grad_like(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p)

    def unscale(self, grads: list[torch.Tensor], scale: float) -> None:
        torch._foreach_div_(grads, scale)

    def global_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm

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
