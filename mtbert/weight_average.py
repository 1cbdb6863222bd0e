"""An exponential moving average of the weights (``train.ema_decay``): the run evaluates, keeps as
best, writes as final and predicts with the average, while the optimizer keeps stepping the raw
weights.

Why: the one-task-per-step schedules move the encoder towards one task at each step; the
average smooths that back-and-forth (and the noise of small batches) at the cost of one pass
over the parameters per step. The decay warms up as in TensorFlow's ExponentialMovingAverage
with ``num_updates``: ``d_t = min(decay, (1 + t) / (10 + t))``, so the first steps do not keep
the pre-trained weights for a long horizon in a short fine-tune.

Every rank holds the same average (the parameters are replicated under DDP and ZeRO-1/2; ZeRO-3
is refused in accelerator.py: its parameters are partitions), so the equivalence matrix proves
it through the final weights and the per-step ``ema_gap``. The average is registered with
Accelerate's checkpointing (``register_for_checkpointing``): a resume continues it exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.names, self.params = zip(*module.named_parameters()) if list(module.parameters()) else ((), ())
        # fp32 whatever the parameter dtype (DeepSpeed bf16 holds bf16 parameters): [P_i] each
        self.average = [p.detach().float().clone() for p in self.params]

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
        return {"decay": self.decay, "updates": self.updates, "names": list(self.names),
                "average": [a.cpu() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(f"the checkpoint's weight average is of {len(state['names'])} other parameters "
                             f"than this model's {len(self.names)}")
        self.updates = state["updates"]
        for a, s in zip(self.average, state["average"]):
            a.copy_(s)


@contextmanager
def evaluated_weights(average: WeightAverage | None):
    """The weights a run evaluates and saves: the average when there is one."""
    if average is None:
        yield
    else:
        with average.applied():
            yield
