"""DeepSpeed ZeRO-1/2: the engine owns the optimizer step; mtbert owns accumulation."""

from __future__ import annotations

import torch

from mtbert.optim.gradients import GradientBuffers, make_reducer


class DeepSpeedEngine:
    def __init__(self, accelerator, model, optimizer, scheduler, params: list, clip: float, idle: str,
                 per_task: bool):
        self.engine = accelerator.deepspeed_engine_wrapped.engine
        # Accelerate hands DeepSpeed only its own scheduler classes; ours (a LambdaLR) stays
        # outside the engine, so we step it once per mtbert step, applied or skipped alike.
        assert self.engine.lr_scheduler is None, "mtbert steps its LR scheduler itself"
        self.sched, self.params, self.scaled = scheduler, params, False

    def backward(self, loss: torch.Tensor, last: bool, scale: float = 1.0) -> None:
        self._loss_scale(scale)
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def _loss_scale(self, scale: float) -> None:
        """fp16 (mtbert's: autocast over this fp32 engine): the ZeRO optimizer's own external loss
        scale (``override_loss_scale``, stage_1_and_2.py / stage3.py) multiplies the loss in
        ``backward`` and divides the gradients in ``step`` before the norm, the clipping and the
        non-finite check. Left alone (DeepSpeed's default) unless fp16 ever asked for it."""
        if scale != 1.0 or self.scaled:
            self.engine.optimizer.override_loss_scale(float(scale))
            self.scaled = True

    def step(self, per_task: bool, schedule: bool = True, scale: float = 1.0) -> tuple[torch.Tensor, bool]:
        """Clipping and the optimizer step happen inside ``engine.step`` (ZeRO unscales, clips on
        its partitions and skips a step whose norm is not finite). -> (pre-clip norm, applied)."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None or not applied else float(norm))
        if schedule:
            self.sched.step()
        return norm, applied

    def hand_over(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], schedule: bool = True):
        """Give the engine gradient g for each (parameter, g) and step. -> (norm, applied)."""
        self._loss_scale(1.0)  # g is unscaled already (fp16: the rows were)
        self.engine.set_gradient_accumulation_boundary(True)
        surrogate = torch.stack([(p * g.to(p.dtype)).float().sum() for p, g in pairs]).sum()
        self.engine.backward(surrogate)
        return self.step(per_task=True, schedule=schedule)

    def skip(self) -> None:
        self.engine.zero_grad()
        self.sched.step()

    # -- the per-task path ------------------------------------------------------------------
    attach_rows = False  # DeepSpeed's gradient hooks would take .grad: rows are filled from autograd.grad
    forward_through_wrapper = False  # autograd.grad on the module's own graph

    def make_buffers(self, module, tasks: list[str], world: int, gram_blocks: str) -> GradientBuffers:
        return GradientBuffers(module, tasks, world, gram_blocks)

    def make_reducer(self, kind: str, collectives, K: int):
        return make_reducer(kind, collectives, K)

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
