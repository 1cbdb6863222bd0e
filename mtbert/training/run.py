"""A run's state, as setup builds it and fit/finish use it: ``Run`` (everything), ``TrainState``
(where the run is) and ``LogWindow`` (what the next train metrics line averages); the last two
are saved in every checkpoint (resume.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtbert.config.schema import Config
from mtbert.data.batching import TokenizedSplit
from mtbert.data.sampler import ShardedTaskSampler
from mtbert.data.tasks import TaskSpec
from mtbert.distributed.collectives import Collectives
from mtbert.methods.phases import Phase
from mtbert.model.heads import MultitaskModel
from mtbert.report.reporter import Reporter
from mtbert.training.step import Stepper


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (with the sampler's and scaler's state)."""

    step: int = 0
    best: float = -1.0  # best dev overall so far
    bad_streak: int = 0  # non-finite steps in a row
    evaluated: int = -1  # step of the last evaluation at a phase end (0: the one at the start)
    examples: int = 0  # training examples of the global batches so far (time-to-quality: mtbert.report.quality)


@dataclass
class LogWindow:
    """What the next train metrics line averages: time, examples, tokens, step stats."""

    t0: float = field(default_factory=time.time)
    examples: int = 0
    tokens: int = 0
    stats: dict[str, list] = field(default_factory=dict)

    def state_dict(self) -> dict:  # the step stats; rates after a resume count from the resume
        return {"stats": {k: [float(v) for v in vs] for k, vs in self.stats.items()}}

    @classmethod
    def from_state(cls, saved: dict) -> LogWindow:
        return cls(stats=saved["stats"])


@dataclass
class Run:
    """Everything ``setup`` builds and ``fit``/``finish`` use."""

    cfg: Config
    accelerator: object  # accelerate.Accelerator
    reporter: Reporter
    collectives: Collectives
    specs: dict[str, TaskSpec]
    module: MultitaskModel  # the model itself (unwrapped)
    model: torch.nn.Module  # as prepared by Accelerate (DDP / DeepSpeed engine / the module)
    train: dict[str, TokenizedSplit]
    dev: dict[str, TokenizedSplit | None]
    test: dict[str, TokenizedSplit | None]
    sampler: ShardedTaskSampler
    phases: list[Phase]
    total: int  # optimizer steps of the whole run
    scheduler: object
    stepper: Stepper
    autocast: object = None
    scaler: object = None
    average: object = None  # weight_average.WeightAverage when train.ema_decay > 0
    state: TrainState = field(default_factory=TrainState)
    window: LogWindow = field(default_factory=LogWindow)  # checkpointed: metrics after a resume are unchanged
    settings: dict = field(default_factory=dict)  # what decides the trained weights (resume.run_settings)
    resumed: bool = False
    sizes: dict = field(default_factory=dict)  # parameter counts and memory estimate for summary.json
    lock: object = None  # run_lock.RunLock held by the main process for the whole run

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def global_mean_losses(stats: dict[str, list], coll: Collectives) -> None:
    """Replace each rank's share-weighted task losses by their mean over ranks: the loss of
    the global batch (every rank holds the same keys and counts: the task plan is global)."""
    keys = sorted(k for k in stats if k.startswith("loss/"))
    if coll.world == 1 or not keys:
        return
    flat = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in stats[k]]).to(coll.device).sum()
                        for k in keys])
    counts = [len(stats[k]) for k in keys]
    coll.all_reduce_mean_(flat)
    for k, total, n in zip(keys, flat.tolist(), counts):
        stats[k] = [total / n] * n
