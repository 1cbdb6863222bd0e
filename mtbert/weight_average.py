"""An exponential moving average of the weights (``train.ema_decay``): the run evaluates, keeps as
best, writes as final and predicts with the average, while the optimizer keeps stepping the raw
weights.

Why: the one-task-per-step schedules move the encoder towards one task at each step; the
average smooths that back-and-forth (and the noise of small batches) at the cost of one pass
over the parameters per step. The decay warms up as in TensorFlow's ExponentialMovingAverage
with ``num_updates``: ``d_t = min(decay, (1 + t) / (10 + t))``, so the first steps do not keep
the pre-trained weights for a long horizon in a short fine-tune.

Under DDP and ZeRO-1/2 every rank holds the whole average (the parameters are replicated).
Under ZeRO-3 each rank averages its own partition of every parameter (``p.ds_tensor``, what the
forward gathers from; the optimizer's fp32 master partitions are never touched), so the
average costs 1/N of the memory there too; ``gap`` sums over ranks, and the checkpointed state
holds whole parameters (gathered; each rank takes its slice back on resume). The equivalence
matrix proves it through the final weights and the per-step ``ema_gap``. The average is
registered with Accelerate's checkpointing (``register_for_checkpointing``, whose ``save_state``
calls ``state_dict`` on every rank): a resume continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float, collectives=None):
        """collectives: given under ZeRO-3 (the parameters are partitions, ``p.ds_tensor``)."""
        self.decay, self.updates, self.coll = decay, 0, collectives
        self.names, params = zip(*module.named_parameters()) if list(module.parameters()) else ((), ())
        self.full = params  # the module's parameters (whole, or ZeRO-3's placeholders)
        # fp32 whatever the parameter dtype (DeepSpeed bf16 holds bf16 parameters): [P_i] (or [P_i / N]) each
        self.average = [p.detach().float().clone() for p in self.params]  # (ZeRO-3: without the padding)

    @property
    def params(self) -> list:
        """What is averaged: the parameters, or under ZeRO-3 the real elements of this rank's
        partitions, looked up each time. A partition is zero-padded to equal size on the last
        ranks, but the padding DeepSpeed loads from a checkpoint is not zeroed (garbage, inf in
        ``gap`` after a resume, 2026-12-07), so it is left out."""
        if self.coll is None:
            return list(self.full)
        out = []
        for p in self.full:
            n = p.ds_tensor.numel()
            out.append(p.ds_tensor.narrow(0, 0, max(0, min(n, p.ds_numel - self.coll.rank * n))))
        return out

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
        if self.coll is not None:  # partitions: the sum over ranks (a partition's padding is 0 on both sides)
            sq = sq.double().reshape(1).to(self.coll.device)
            self.coll.all_reduce_sum_(sq)
        return float(sq) ** 0.5  # one host sync per log line, not one per tensor

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

    # Accelerate's register_for_checkpointing: saved by the main process in save_state, loaded
    # on every rank in load_state.
    def state_dict(self) -> dict:
        average = self.average if self.coll is None else [self._gather(a, p) for a, p in zip(self.average, self.full)]
        return {"decay": self.decay, "updates": self.updates, "names": list(self.names),
                "average": [a.cpu() for a in average]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(f"the checkpoint's weight average is of {len(state['names'])} other parameters "
                             f"than this model's {len(self.names)}")
        self.updates = state["updates"]
        for a, s, p in zip(self.average, state["average"], self.full):
            if self.coll is not None:  # this rank's slice of the whole parameter
                start = self.coll.rank * p.ds_tensor.numel()
                s = s.reshape(-1)[start:start + a.numel()]
            a.copy_(s.reshape(a.shape))

    def _gather(self, part: torch.Tensor, param) -> torch.Tensor:
        """Every rank's partition of one parameter (without padding) -> the whole parameter (a collective)."""
        n = param.ds_tensor.numel()
        padded = torch.zeros(n, dtype=part.dtype, device=self.coll.device)
        padded[:part.numel()] = part
        out = torch.empty(n * self.coll.world, dtype=part.dtype, device=self.coll.device)
        self.coll.all_gather_into(out, padded)
        return out[:param.ds_numel].reshape(param.ds_shape)


@contextmanager
def evaluated_weights(average: WeightAverage | None):
    """The weights a run evaluates and saves: the average when there is one."""
    if average is None:
        yield
    else:
        with average.applied():
            yield
