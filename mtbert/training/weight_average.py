"""An exponential moving average of the weights (``train.ema_decay``): the run evaluates, keeps as
best, writes as final and predicts with the average, while the optimizer keeps stepping the raw
weights.

Why: the one-task-per-step schedules move the encoder towards one task at each step; the
average smooths that back-and-forth (and the noise of small batches) at the cost of one pass
over the parameters per step. The decay warms up as in TensorFlow's ExponentialMovingAverage
with ``num_updates``: ``d_t = min(decay, (1 + t) / (10 + t))``, so the first steps do not keep
the pre-trained weights for a long horizon in a short fine-tune.

Where the average lives follows the parameters (a ``layout``): under DDP and ZeRO-1/2 every rank
holds the whole average (the parameters are replicated); under ZeRO-3 each rank averages its own
partition of every parameter (``p.ds_tensor``, what the forward gathers from; the optimizer's
fp32 master partitions are never touched), under FSDP2 its DTensor shards, so the average costs
1/N of the memory there too; ``gap`` sums over ranks, and the checkpointed state holds whole
parameters (gathered; each rank takes its part back on resume). The equivalence
matrix proves it through the final weights and the per-step ``ema_gap``. The average is
registered with Accelerate's checkpointing (``register_for_checkpointing``, whose ``save_state``
calls ``state_dict`` on every rank): a resume continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class Replicated:
    """Every rank holds whole parameters (one process, DDP, ZeRO-1/2)."""

    def local(self, p):
        return p

    def gather(self, part, p):
        return part

    def take(self, whole, p):
        return whole

    def total(self, sq):
        return sq


class Zero3Partitions:
    """ZeRO-3: rank r holds elements [r n, (r + 1) n) of each flattened parameter (``p.ds_tensor``,
    n = ``p.partition_numel()``), zero-padded to n on the last ranks. The padding DeepSpeed loads
    from a checkpoint is not zeroed (garbage, inf in ``gap`` after a resume, 2026-12-07), so only
    the real elements are averaged; ``p.ds_tensor`` is looked up each time (loading may replace it)."""

    def __init__(self, collectives):
        self.coll = collectives

    def local(self, p):
        n = p.ds_tensor.numel()
        return p.ds_tensor.narrow(0, 0, max(0, min(n, p.ds_numel - self.coll.rank * n)))

    def gather(self, part, p):  # a collective
        n = p.ds_tensor.numel()
        padded = torch.zeros(n, dtype=part.dtype, device=self.coll.device)
        padded[:part.numel()] = part
        out = torch.empty(n * self.coll.world, dtype=part.dtype, device=self.coll.device)
        self.coll.all_gather_into(out, padded)
        return out[:p.ds_numel].reshape(p.ds_shape)

    def take(self, whole, p):
        start = self.coll.rank * p.ds_tensor.numel()
        return whole.reshape(-1)[start:start + self.local(p).numel()]

    def total(self, sq):
        sq = sq.double().reshape(1).to(self.coll.device)
        self.coll.all_reduce_sum_(sq)
        return sq


class Fsdp2Shards(Zero3Partitions):
    """FSDP2: each parameter is a DTensor sharded on dim 0 as ``torch.chunk`` cuts it (uneven
    chunks, none on some ranks for a small tensor); the average is kept of ``to_local()``."""

    def local(self, p):
        return p.to_local()

    def gather(self, part, p):  # a collective
        from mtbert.distributed.engines.fsdp2 import gather_shards
        return gather_shards(part, p)

    def take(self, whole, p):
        chunks = torch.chunk(whole, self.coll.world, dim=0)
        return chunks[self.coll.rank] if self.coll.rank < len(chunks) else whole[:0]


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float, layout=None):
        """layout: where the parameters live (``Replicated`` by default; ``Zero3Partitions``,
        ``Fsdp2Shards``): the average is kept of this rank's part of each parameter."""
        self.decay, self.updates, self.layout = decay, 0, layout or Replicated()
        self.names, self.full = zip(*module.named_parameters()) if list(module.parameters()) else ((), ())
        # fp32 whatever the parameter dtype (DeepSpeed bf16 holds bf16 parameters): one per parameter
        self.average = [p.detach().float().clone() for p in self.params]

    @property
    def params(self) -> list:
        """This rank's part of every parameter (views; looked up each time)."""
        return [self.layout.local(p) for p in self.full]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step that was applied (a skipped step leaves the average alone)."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - d)  # one call
        self.updates += 1

    @torch.no_grad()
    def gap(self) -> float:
        """||raw - average|| over every parameter: the scale-sensitive per-step quantity that the
        equivalence tests compare (an average updated twice, or from other weights, moves it)."""
        sq = torch.stack([(p.detach().float() - a).pow(2).sum() for a, p in zip(self.average, self.params)]).sum()
        return float(self.layout.total(sq)) ** 0.5  # one host sync per log line, not one per tensor

    @torch.no_grad()
    def apply(self) -> None:
        """The average into the module's parameters (for good: at the end of training)."""
        for a, p in zip(self.average, self.params):
            p.copy_(a)

    @contextmanager
    def applied(self):
        """The average in the module's parameters for the ``with`` body; the raw weights after."""
        raw = [p.detach().clone() for p in self.params]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for r, p in zip(raw, self.params):
                    p.copy_(r)

    # Accelerate's register_for_checkpointing: save_state calls state_dict on every rank (a
    # collective when the parameters are sharded) and writes the main process's; load_state
    # calls load_state_dict on every rank.
    def state_dict(self) -> dict:
        average = [self.layout.gather(a, p) for a, p in zip(self.average, self.full)]
        return {"decay": self.decay, "updates": self.updates, "names": list(self.names),
                "average": [a.cpu() for a in average]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(f"the checkpoint's weight average is of {len(state['names'])} other parameters "
                             f"than this model's {len(self.names)}")
        self.updates = state["updates"]
        for a, whole, p in zip(self.average, state["average"], self.full):
            a.copy_(self.layout.take(whole.to(a.device), p).reshape(a.shape))


@contextmanager
def evaluated_weights(average: WeightAverage | None):
    """The weights a run evaluates and saves: the average when there is one."""
    if average is None:
        yield
    else:
        with average.applied():
            yield
