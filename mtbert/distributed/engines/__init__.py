"""How a step's gradient reaches the optimizer, per engine. The step (step.py) computes
losses, per-task gradients and weights; an engine does the backward of a summed loss, takes a
combined gradient, clips, steps, and reports the pre-clip norm and whether the step applied.

- ``TorchEngine`` (torch_engine.py): one process or DDP (Accelerate-prepared torch optimizer).
- ``DeepSpeedEngine`` (zero.py): ZeRO-1/2. mtbert owns gradient accumulation: DeepSpeed is configured
  with ``gradient_accumulation_steps=1`` and told where the boundary is
  (``set_gradient_accumulation_boundary``), so it steps once per mtbert step and never
  rescales a loss by its own accumulation count. A combined gradient is handed over through
  a surrogate backward of ``sum(p * g)`` (gradient g for every p), which ZeRO partitions,
  averages (identical on every rank), clips and steps like any gradient.
- ``Zero3Engine`` (zero3.py) and ``Fsdp2Engine`` (fsdp2.py): sharded parameters; per-task
  methods work on this rank's partition (shard) of each task's gradient, which the engine's own
  reduce-scatter leaves after each backward: only the K x K Gram is all-reduced.

Parameters that got no gradient in a step (an absent task's head, an ARRP-frozen encoder):
``idle="keep"`` leaves ``grad=None`` so AdamW skips them; ``idle="step"`` gives them a zero
gradient so AdamW still applies moment decay and weight decay — what DeepSpeed's flat ZeRO
optimizers always do, so it is the only setting there (accelerator.py enforces it).
"""

from __future__ import annotations

from mtbert.distributed.engines.fsdp2 import Fsdp2Engine, marked
from mtbert.distributed.engines.torch_engine import TorchEngine
from mtbert.distributed.engines.zero import DeepSpeedEngine
from mtbert.distributed.engines.zero3 import Zero3Engine

__all__ = ["DeepSpeedEngine", "Fsdp2Engine", "TorchEngine", "Zero3Engine", "make_engine"]


def make_engine(accelerator, model, optimizer, scheduler, params, cfg, per_task: bool):
    if marked(accelerator):  # mtbert's FSDP2 (distributed/engines/fsdp2.py), from an FSDP launch or the step tests
        cls = Fsdp2Engine
    elif accelerator.distributed_type != "DEEPSPEED":
        cls = TorchEngine
    else:
        cls = Zero3Engine if accelerator.state.deepspeed_plugin.zero_stage == 3 else DeepSpeedEngine
    return cls(accelerator, model, optimizer, scheduler, params, cfg.train.grad_clip, cfg.train.idle_params, per_task)
