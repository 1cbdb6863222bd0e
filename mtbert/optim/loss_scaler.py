"""Dynamic loss scale for fp16 in the per-task path.

``torch.amp.GradScaler`` unscales the optimizer's ``.grad`` tensors, but in the per-task path
the gradients live in buffer rows and must be unscaled *before* the Gram matrix's dot
products; step.py divides the rows by ``scale`` and reports overflow from the all-reduced
Gram diagonal, so every rank updates the scale the same way.
"""

from __future__ import annotations


class LossScaler:
    """Dynamic loss scale: halve on overflow, double after ``growth_interval`` good steps."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good = scale, growth_interval, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good = self.scale / 2, 0
        else:
            self.good += 1
            if self.good % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self):
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, s):
        self.scale, self.good = s["scale"], s["good"]
