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

Launch (``accelerate launch --config_file accelerate_configs/fsdp2.yaml``): mtbert applies FSDP2
itself, on CPU (gloo) and GPU alike — Accelerate drops its FSDP plugin on CPU, and on GPUs its own
``fully_shard`` wrapping would hide the shards the per-task path reads. accelerator.py builds the
Accelerator without the plugin and marks it (``mark``); train.py shards the model with
``shard_model`` on ``Collectives.device_mesh`` before the optimizer exists, prepares neither model
nor optimizer with Accelerate, and checkpoints them through ``ShardedTrainingState`` (whole
state dicts, gathered on save and sharded again on load); ``full_state_dict`` and
``load_full_state_dict`` give the best/final weights.
"""

from __future__ import annotations

import torch

from mtbert.distributed.engines.torch_engine import TorchEngine
from mtbert.optim.gradients import GramOnlyReducer, TaskRows, block_ranges, split_parameters


def shard_model(module: torch.nn.Module, mesh) -> torch.nn.Module:
    """fully_shard each encoder layer, the word embedding, then the whole model (FSDP2's usual
    wrapping: one all-gather per layer in forward and backward, the rest — position embeddings,
    heads, per-task layers — in the root). The word embedding is a unit of its own because SMART
    calls it outside the model's forward (methods/smart.py), where only its own hooks gather it."""
    from torch.distributed.fsdp import fully_shard
    for layer in module.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module.encoder.emb.word, mesh=mesh)
    return fully_shard(module, mesh=mesh)


def mark(accelerator) -> None:
    """This launch's model is sharded by mtbert's FSDP2 (make_engine and train.py read it)."""
    accelerator.mtbert_fsdp2 = True


def marked(accelerator) -> bool:
    return bool(getattr(accelerator, "mtbert_fsdp2", False)) or getattr(accelerator, "distributed_type", "") == "FSDP"


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Every parameter whole (a collective: every rank calls it), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Whole parameters (the same on every rank) -> each rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def gather_shards(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor sharded like the DTensor parameter ``like`` (this rank's ``local`` part) -> whole
    (an all-gather on the parameter's mesh: every rank calls it)."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


class ShardedTrainingState:
    """The model's and optimizer's state in Accelerate's checkpoints (``register_for_checkpointing``:
    ``save_state`` calls ``state_dict`` on every rank and writes rank 0's; ``load_state`` calls
    ``load_state_dict`` on every rank): whole tensors, so a checkpoint does not depend on the
    number of ranks' shard boundaries."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": full_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options)}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        load_full_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))


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

    def coordinates(self, rank: int, world: int) -> torch.Tensor:
        """[P_local] each column's global coordinate (the place of its element in the shared
        parameters, module order, as in the 1-process rows): a dim-0 shard is a contiguous run."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        parts, base = [], 0
        for p in self.shared:
            n = _local(p).numel()
            if hasattr(p, "device_mesh"):
                _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                start = offset[0] * (p.numel() // max(1, p.shape[0]))
            else:
                start = 0
            parts.append(base + start + torch.arange(n))
            base += p.numel()
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

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

    def hand_back(self, present: list[str], shared: bool = True) -> None:
        """DTensor gradients <- the update's shards (shared; not under ARRP's head-only batches,
        where only the heads train) and the present tasks' head shards."""
        pairs = [(self.shared, self.update)] * shared + [(self.private[t], self.priv_flat[t]) for t in present]
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

    def zero_grad_like(self, p) -> torch.Tensor:
        return _like(p, torch.zeros_like(_local(p)))  # a DTensor of zeros on this rank's shard

    def unscale(self, grads: list, scale: float) -> None:
        for g in grads:  # DTensor gradients, one by one
            g.div_(scale)

    def global_norm(self, norm) -> torch.Tensor:
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor -> the global norm

    def make_buffers(self, module, tasks: list[str], world: int, gram_blocks: str) -> ShardRows:
        return ShardRows(module, tasks, gram_blocks)

    def make_reducer(self, kind: str, collectives, K: int) -> GramOnlyReducer:
        local = sum(_local(p).numel() for p in self.params)
        return GramOnlyReducer(collectives, local * 4)

    def task_backward(self, buffers: ShardRows, task: str, loss: torch.Tensor) -> None:
        loss.backward()  # reduce-scatter: p.grad is this rank's shard of the task's averaged gradient
        buffers.capture(task)

    def apply_update(self, buffers: ShardRows, present: list[str], head_only, last: bool):
        # head_only (ARRP): no shared update (one process discards it too: an all-zero Gram's
        # update can be NaN for a method undefined there, e.g. Nash-MTL); idle parameters follow idle
        buffers.hand_back(present, shared=head_only is None)
        return self.step(per_task=True, schedule=last)

    def clear_frozen(self, head_only) -> None:
        """Nothing to clear: the head-only forward gave the rest no gradient."""
