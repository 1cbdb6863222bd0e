"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with every method: gradient surgery on the
DTensor shards, with no full gradient on any rank.

After a backward, FSDP2 has reduce-scattered each parameter's gradient (averaged over ranks)
and ``p.grad`` is a DTensor whose ``to_local()`` is this rank's dim-0 shard. The per-task path
copies those shards into row k of a local ``[K, P_local]`` buffer after task k's backward and
clears ``p.grad`` (FSDP2 would otherwise accumulate the next task into it); the partial Gram
matrix is all-reduced (``GramOnlyReducer``), every rank computes the same weights, and the
shards of ``w @ rows`` become the parameters' DTensor gradients, which the optimizer (sharded
parameters, sharded state) steps where they lie. Shards are uneven when a dimension does not
divide by N (a rank may hold none of a small tensor): each rank works with its own lengths.

The summed path is torch's: one backward per micro-batch (FSDP2 reduce-scatters each; the
DTensor gradients accumulate), then clip and step. ``clip_grad_norm_`` of DTensor gradients
returns a DTensor: its ``full_tensor()`` is the global norm, the same on every rank.

Launch: ``fully_shard`` needs a device mesh; Accelerate applies it for ``fsdp_version: 2``
(accelerate_configs/fsdp2.yaml) on GPUs only — on CPU Accelerate drops the FSDP plugin
(accelerator.py refuses that launch). ``shard_model`` is what the tests apply on a CPU mesh.
"""

from __future__ import annotations

import torch

from mtbert.engines.torch_engine import TorchEngine
from mtbert.optim.gradients import GramOnlyReducer, TaskRows, block_ranges, split_parameters


def shard_model(module: torch.nn.Module, mesh) -> torch.nn.Module:
    """fully_shard each encoder layer, then the whole model (FSDP2's usual wrapping: one
    all-gather per layer in forward and backward, the rest — embeddings, heads — in the root)."""
    from torch.distributed.fsdp import fully_shard
    for layer in module.encoder.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def plain_accelerator(world: int, rank: int, kind: str = "FSDP"):
    """What Stepper and the engines read of an Accelerator, for steps outside Accelerate (which
    has no FSDP on CPU): the step-level tests and ``python -m mtbert.bench --parts fsdp2``."""
    import contextlib
    import types
    return types.SimpleNamespace(
        num_processes=world, process_index=rank, device=torch.device("cpu"), distributed_type=kind,
        unwrap_model=lambda m: m, autocast=contextlib.nullcontext, no_sync=lambda m: contextlib.nullcontext(),
        backward=lambda loss: loss.backward(), clip_grad_norm_=torch.nn.utils.clip_grad_norm_)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardRows(TaskRows):
    """This rank's dim-0 shards of the per-task gradients; the Stepper's GradientBuffers interface
    (start, rows, blocks, set_update). Shared columns in module order: blocks are ranges."""

    def __init__(self, module: torch.nn.Module, tasks: list[str], gram_blocks: str = "whole"):
        names, self.shared, self.private = split_parameters(module, tasks)
        self.tasks = list(tasks)
        sizes = [_local(p).numel() for p in self.shared]
        ref = _local(next(p for p in module.parameters() if p.requires_grad))
        self.G = torch.zeros(len(tasks), sum(sizes), dtype=torch.float32, device=ref.device)  # [K, P_local]
        self.update = torch.zeros(sum(sizes), dtype=torch.float32, device=ref.device)
        self.priv_flat = {t: torch.zeros(sum(_local(p).numel() for p in ps), dtype=torch.float32, device=ref.device)
                          for t, ps in self.private.items()}
        self.blocks = block_ranges(names, sizes, sum(sizes), gram_blocks)

    def start(self, present: list[str], attach: bool = False) -> None:
        for t in present:
            self.G[self.tasks.index(t)].zero_()
            self.priv_flat[t].zero_()
        for p in self.shared + [p for ps in self.private.values() for p in ps]:
            p.grad = None

    def capture(self, task: str) -> None:
        """Task ``task``'s reduced shards (``p.grad`` since its backward) -> its rows; grads cleared."""
        for flat, params in ((self.G[self.tasks.index(task)], self.shared), (self.priv_flat[task], self.private[task])):
            offset = 0
            for p in params:
                n = _local(p).numel()
                if p.grad is not None:
                    flat[offset:offset + n].add_(_local(p.grad).reshape(-1).float())
                    p.grad = None
                offset += n

    def hand_back(self, present: list[str]) -> None:
        """DTensor gradients <- the update's shards (shared) and the present tasks' head shards."""
        pairs = [(self.shared, self.update)] + [(self.private[t], self.priv_flat[t]) for t in present]
        for params, flat in pairs:
            offset = 0
            for p in params:
                local = _local(p)
                g = flat[offset:offset + local.numel()].view_as(local).to(local.dtype).clone()
                offset += local.numel()
                p.grad = _like(p, g)


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A gradient for ``p`` from this rank's shard: a DTensor with p's mesh, placements and shape."""
    if not hasattr(p, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


class Fsdp2Engine(TorchEngine):
    """FSDP2: TorchEngine's step (clip, step, zero, schedule) on DTensor gradients; the per-task
    path captures the reduce-scattered shards (ShardRows) instead of full rows."""

    attach_rows = False
    forward_through_wrapper = True  # the fully_shard'ed module is the model: its hooks gather

    def backward(self, loss: torch.Tensor, last: bool, scale: float = 1.0) -> None:
        (loss * scale if scale != 1.0 else loss).backward()  # FSDP2 reduce-scatters; the DTensor grads accumulate

    def step(self, per_task: bool, schedule: bool = True, scale: float = 1.0):
        with_grad = [p for p in self.params if p.grad is not None]
        if scale != 1.0:
            for p in with_grad:
                p.grad.div_(scale)
        if self.idle == "step":
            for p in self.params:
                if p.grad is None:
                    p.grad = _like(p, torch.zeros_like(_local(p)))
            with_grad = list(self.params)
        norm = torch.nn.utils.clip_grad_norm_(with_grad, self.clip, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor -> the global norm
        applied = bool(torch.isfinite(norm))
        if applied:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if schedule:
            self.sched.step()
        return norm, applied

    def make_buffers(self, module, tasks: list[str], world: int, gram_blocks: str) -> ShardRows:
        return ShardRows(module, tasks, gram_blocks)

    def make_reducer(self, kind: str, collectives, K: int) -> GramOnlyReducer:
        local = sum(_local(p).numel() for p in self.params)
        return GramOnlyReducer(collectives, local * 4)

    def task_backward(self, buffers: ShardRows, task: str, loss: torch.Tensor) -> None:
        loss.backward()  # reduce-scatter: p.grad is this rank's shard of the task's averaged gradient
        buffers.capture(task)

    def apply_update(self, buffers: ShardRows, present: list[str], head_only, last: bool):
        buffers.hand_back(present)
        return self.step(per_task=True, schedule=last)

    def clear_frozen(self, head_only) -> None:
        """Nothing to clear: the head-only forward gave the rest no gradient."""
