"""DeepSpeed ZeRO-3 with per-task methods: gradient surgery on partitions, with no full
gradient on any rank.

Under ZeRO-3 each rank holds 1/N of every parameter (``p.ds_tensor``), and the engine's
backward hooks reduce-scatter each gradient as it is produced, averaged over ranks, into this
rank's partition of one flat buffer. So after task k's backward this rank already holds its
partition of task k's *global* gradient: it is copied into row k of a local ``[K, P/N]`` buffer
(shared parameters' columns) and a private buffer (task k's head), and the flat buffer is
zeroed for the next task. After all tasks the partial Gram matrix of the local columns is
all-reduced (``[L, K, K]`` floats), every rank computes the same weights (the aggregators are
unchanged), writes ``w @ rows`` and the heads' gradients back into the flat buffer, and the
engine steps as usual: global norm, clipping, skip on a non-finite norm, fp32 master weights.
Per step: the engine's K reduce-scatters and one K x K all-reduce; no all-gather of the update
(the parameters are gathered at the next forward anyway); gradient memory per rank
(K + 1) P / N plus DeepSpeed's buckets.

DeepSpeed internals this relies on (deepspeed/runtime/zero/stage3.py, 0.19.8), checked at
start-up where they can be:
- ``DeepSpeedZeroOptimizer_Stage3.grad_partitions_flat_buffer``: this rank's gradient partitions
  of every trainable parameter, laid out in ``chain(fp16_groups)`` order, ``p.partition_numel()``
  elements each (``__init__``; the same layout is rebuilt in ``reload_states``). We check it
  against the public ``deepspeed.utils.safe_get_local_grad(p)`` views.
- ``partition_grads``: after each backward the reduced partition is *copied* into that buffer
  at ``micro_step_id == 0`` and *added* otherwise; zeroing the buffer after each task makes
  both the same.
- ``independent_gradient_partition_epilogue()`` (run at the end of every backward) points
  ``averaged_gradients`` at the buffer's views; ``step`` reads and then drops them
  (``_prepare_sub_group``), so it is called again before each hand-over (GSE steps twice).
"""

from __future__ import annotations

import itertools

import torch

from mtbert.distributed.engines.zero import DeepSpeedEngine
from mtbert.optim.gradients import GramOnlyReducer, TaskRows, block_ranges, split_parameters


def _positions(offsets: dict, params: list, device) -> torch.Tensor:
    """Flat-buffer positions of ``params``' partitions, in the given order ([n] long)."""
    parts = [torch.arange(offsets[id(p)][0], offsets[id(p)][0] + offsets[id(p)][1]) for p in params]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)


class PartitionRows(TaskRows):
    """This rank's partitions of the per-task gradients. The shared columns are in the module's
    parameter order, so each parameter block (``method.gram_blocks=layer``) is a column range.
    The interface the Stepper uses is GradientBuffers': start, rows, blocks, set_update."""

    def __init__(self, optimizer, module: torch.nn.Module, tasks: list[str], gram_blocks: str = "whole"):
        self.optimizer, self.tasks = optimizer, list(tasks)
        flat = optimizer.grad_partitions_flat_buffer
        grouped = list(itertools.chain.from_iterable(optimizer.fp16_groups))
        offsets, offset = {}, 0
        for p in grouped:
            offsets[id(p)] = (offset, p.partition_numel())
            offset += p.partition_numel()
        _check_layout(grouped, offsets, offset, flat)
        names, shared, private = split_parameters(module, tasks)
        self.shared = shared
        self.shared_idx = _positions(offsets, shared, flat.device)  # [P_local]
        self.private_idx = {t: _positions(offsets, private[t], flat.device) for t in tasks}
        P = self.shared_idx.numel()
        # fp32 rows whatever the gradient dtype (bf16 partitions would round the Gram).
        self.G = torch.zeros(len(tasks), P, dtype=torch.float32, device=flat.device)  # [K, P_local]
        self.update = torch.zeros(P, dtype=torch.float32, device=flat.device)
        self.priv_flat = {t: torch.zeros(idx.numel(), dtype=torch.float32, device=flat.device)
                          for t, idx in self.private_idx.items()}
        self.blocks = block_ranges(names, [offsets[id(p)][1] for p in shared], P, gram_blocks)

    def coordinates(self, rank: int, world: int) -> torch.Tensor:
        """[P_local] each column's global coordinate (the place of its element in the shared
        parameters, module order, as in the 1-process rows); -1 for DeepSpeed's padding. A
        parameter's partition on rank r holds its flat elements [r pn, (r + 1) pn)."""
        parts, base = [], 0
        for p in self.shared:
            pn = p.partition_numel()
            elem = rank * pn + torch.arange(pn)
            parts.append(torch.where(elem < p.ds_numel, base + elem, -1))
            base += p.ds_numel
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @property
    def flat(self) -> torch.Tensor:
        return self.optimizer.grad_partitions_flat_buffer  # looked up each time: reload_states may move it

    def start(self, present: list[str], attach: bool = False) -> None:
        for t in present:
            self.G[self.tasks.index(t)].zero_()
            self.priv_flat[t].zero_()
        self.flat.zero_()

    def capture(self, task: str) -> None:
        """Task ``task``'s reduced partition (in the flat buffer since its backward) -> its rows."""
        flat = self.flat
        self.G[self.tasks.index(task)].add_(flat.index_select(0, self.shared_idx).float())
        self.priv_flat[task].add_(flat.index_select(0, self.private_idx[task]).float())
        flat.zero_()

    def hand_back(self, present: list[str], shared: bool = True) -> None:
        """The flat buffer <- the combined shared update (unless ``shared`` is False: ARRP's
        head-only batches, where only the heads train) and the present tasks' head gradients."""
        flat = self.flat
        flat.zero_()
        if shared:
            flat.index_copy_(0, self.shared_idx, self.update.to(flat.dtype))
        for t in present:
            flat.index_copy_(0, self.private_idx[t], self.priv_flat[t].to(flat.dtype))


def _check_layout(params: list, offsets: dict, total: int, flat: torch.Tensor) -> None:
    """The layout above, against DeepSpeed's public per-parameter accessor (fp32: views)."""
    from deepspeed.utils import safe_get_local_grad

    if total != flat.numel():
        raise RuntimeError(f"ZeRO-3 gradient partitions: {total} elements expected, the flat buffer has "
                           f"{flat.numel()} (a DeepSpeed version with another layout?)")
    if flat.dtype != torch.float32:
        return  # safe_get_local_grad returns a float copy: nothing to compare addresses with
    size = flat.element_size()
    for p in params:
        view = safe_get_local_grad(p)
        if view is not None and view.numel() and view.data_ptr() != flat.data_ptr() + offsets[id(p)][0] * size:
            raise RuntimeError("ZeRO-3 gradient partitions are not laid out in fp16_groups order in "
                               "grad_partitions_flat_buffer (a DeepSpeed version mtbert does not know)")


class Zero3Engine(DeepSpeedEngine):
    """ZeRO-3: the summed path is DeepSpeedEngine's, with the gradient partitions cleared after
    every step; per-task methods work on partitions.

    Why the clearing (docs/zero3-idle-parameters.md): ZeRO-3 writes a parameter's reduced
    gradient into ``grad_partitions_flat_buffer`` only when its hook fires (``partition_grads``),
    never clears that buffer (``zero_grad`` does not), and steps every parameter with what the
    buffer holds (``independent_gradient_partition_epilogue`` points ``averaged_gradients`` at
    it). A parameter idle in a step (the head of a task the schedule left out) was stepped with
    its gradient of the last step it was used in, and that stale gradient counted in the norm.
    Cleared, an idle parameter gets a zero gradient, as ``train.idle_params=step`` gives it in
    one process."""

    attach_rows = False
    forward_through_wrapper = True  # the engine's forward runs ZeRO-3's gather and accounting hooks

    def step(self, per_task: bool, schedule: bool = True, scale: float = 1.0):
        result = super().step(per_task, schedule, scale)
        self.clear_partitions()
        return result

    def skip(self) -> None:
        super().skip()
        self.clear_partitions()

    def clear_partitions(self) -> None:
        """Zero this rank's gradient partitions (looked up each time: reload_states may re-create
        the buffer). ``partition_grads`` copies into it at the first micro-batch and adds after, so
        a parameter whose first gradient of a step comes in a later micro-batch starts from 0 too."""
        self.engine.optimizer.grad_partitions_flat_buffer.zero_()

    def make_buffers(self, module, tasks: list[str], world: int, gram_blocks: str) -> PartitionRows:
        return PartitionRows(self.engine.optimizer, module, tasks, gram_blocks)

    def make_reducer(self, kind: str, collectives, K: int) -> GramOnlyReducer:
        flat = self.engine.optimizer.grad_partitions_flat_buffer
        return GramOnlyReducer(collectives, flat.numel() * flat.element_size())

    def task_backward(self, buffers: PartitionRows, task: str, loss: torch.Tensor) -> None:
        self._loss_scale(1.0)  # fp16: ``loss`` carries mtbert's scale; the rows are unscaled in step.py
        self.engine.set_gradient_accumulation_boundary(False)  # no step: mtbert steps once, after all tasks
        self.engine.backward(loss)  # reduce-scatter: this rank's partition of the averaged gradient
        buffers.capture(task)

    def apply_update(self, buffers: PartitionRows, present: list[str], head_only, last: bool):
        # head_only (ARRP): the shared parameters get a zero gradient, as under ZeRO-1/2 and in one
        # process with idle_params=step (the update of all-zero rows can be NaN for a method
        # undefined on a zero Gram, e.g. Nash-MTL; one process discards it too).
        buffers.hand_back(present, shared=head_only is None)
        self._loss_scale(1.0)  # the handed-back gradients are unscaled
        self.engine.optimizer.independent_gradient_partition_epilogue()  # averaged_gradients -> the buffer
        self.engine.set_gradient_accumulation_boundary(True)
        return self.step(per_task=True, schedule=last)
