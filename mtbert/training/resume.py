"""What a start does with the run directory it is given — continue it, or put the old run aside —
and what a checkpoint holds of a run (``save_run`` / ``resume_run``).

- ``prepare_run_dir``: a directory holding an earlier run that will not be resumed
  (``train.resume=false``, or no complete checkpoint) is *moved aside* to
  ``<out_dir>.replaced-<time>`` — appending to its ``metrics.jsonl`` or keeping its stale
  checkpoints (which a later resume or pruning would pick up) is how runs got mixed. A
  non-empty directory that is not an mtbert run is refused.
- ``run_settings`` / ``check_compatible``: every checkpoint stores the settings that decide what
  is trained (the config minus ``FREE_TO_CHANGE``, the number of processes, the engine and
  precision); a resume with other settings is refused with the differing fields named, since
  the sampler positions and optimizer state would silently train something else.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mtbert.errors import ConfigError
from mtbert.optim.aggregators.base import state_from_json, state_to_json
from mtbert.training import checkpoint as ckpt
from mtbert.training.checkpoint import list_checkpoints
from mtbert.training.run import LogWindow, Run, TrainState, global_mean_losses

# Settings that do not change the trained weights: a resume may change them.
FREE_TO_CHANGE = {
    "train.out_dir", "train.resume", "train.progress", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_last", "train.max_bad_steps", "train.compile", "train.predict_test",
    "data.dir", "data.eval_batch_size", "data.max_eval", "method.conflict_stats", "train.eval_at_start",
}
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints", "summary.json")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def default_settings() -> dict:
    """Every field's default, flat. A field added after a run was written is missing from its saved
    settings; the run trained with the default (a new field's default keeps the old behaviour)."""
    import json

    from mtbert.config.schema import Config, to_dict
    flat = _flatten(json.loads(json.dumps(to_dict(Config()))))  # as stored: lists, not tuples
    return {k: v for k, v in flat.items() if k not in FREE_TO_CHANGE}


def run_settings(cfg_dict: dict, processes: int, engine: str) -> dict:
    """The settings a checkpoint records (flat ``section.field`` keys), defaults for fields it lacks."""
    flat = {k: v for k, v in _flatten(cfg_dict).items() if k not in FREE_TO_CHANGE}
    return {**default_settings(), **flat, "processes": processes, "engine": engine}


def check_compatible(saved: dict, now: dict, where: Path) -> None:
    saved = {**default_settings(), **saved}  # written before a field existed: it had the default
    diffs = [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"train.resume: {where} was written with other settings ({'; '.join(diffs)}); "
                          "resume with the same settings, or start a new run (another train.out_dir, "
                          "or train.resume=false to move this one aside)")


def prepare_run_dir(run_dir: Path, resume: bool, is_main: bool) -> str | None:
    """-> a message when an earlier run was moved aside (the caller waits for every rank after)."""
    try:
        if not any(run_dir.iterdir()):
            return None
    except FileNotFoundError:  # (absent, or another rank's main process just moved it)
        return None
    if resume and list_checkpoints(run_dir):
        return None  # choose_checkpoint picks the newest valid one
    if not any((run_dir / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"train.out_dir: {run_dir} is not empty and holds no mtbert run; "
                          "give a new or empty directory")
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
    if is_main:
        os.replace(run_dir, aside)
    why = "train.resume=false" if not resume else "it has no complete checkpoint"
    return f"{run_dir} held an earlier run ({why}): moved it to {aside}"


def save_run(run: Run) -> None:
    global_mean_losses(run.window.stats, run.collectives)  # one window for all ranks (idempotent at log time)
    state = {**vars(run.state), "sampler": run.sampler.state_dict(), "window": run.window.state_dict(),
             "settings": run.settings, "scaler": run.scaler.state_dict() if run.scaler else None,
             "method_state": state_to_json(run.stepper.method_state)}  # GradVac/Nash-MTL/DWA/FAMO: identical on all ranks
    ckpt.save_checkpoint(run.accelerator, run.run_dir, run.state.step, state, run.cfg.train.keep_last,
                         run.stepper.column_state)  # ExcessMTL/MoCo/DB-MTL: per rank, beside its columns


def choose_checkpoint(run_dir: Path, resume: bool, settings: dict, is_main: bool, coll) -> Path | None:
    """The checkpoint this start resumes from, decided before anything is written to the run:
    the main process verifies checkpoints against their manifests, newest first (reporting each
    corrupt one), every rank takes its choice, and one written with other settings is refused."""
    if not resume or not list_checkpoints(run_dir):
        return None
    path = None
    if is_main:
        ckpt.remove_leftovers(run_dir)
        path, _ = ckpt.newest_valid(run_dir, lambda line: print(line, flush=True))
    chosen = coll.gather_objects(str(path) if path else None)[0]
    if chosen is None:
        raise ConfigError(f"train.resume: no checkpoint in {run_dir / 'checkpoints'} matches its manifest "
                          "(all corrupt, see above); give another train.out_dir, or train.resume=false to move "
                          "this run aside")
    check_compatible(ckpt.read_trainer_state(Path(chosen))["settings"], settings, Path(chosen))
    return Path(chosen)


def resume_run(run: Run, chosen: Path | None) -> None:
    """Load the chosen checkpoint (``choose_checkpoint``) into the run, on every rank."""
    if chosen is None:
        return
    saved = ckpt.load_checkpoint(run.accelerator, chosen)
    run.state = TrainState(saved["step"], saved["best"], saved["bad_streak"], saved["evaluated"],
                           saved.get("examples", 0))
    run.window = LogWindow.from_state(saved["window"])
    run.sampler.load_state_dict(saved["sampler"])
    if run.scaler and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.stepper.method_state = state_from_json(saved.get("method_state", {}))
    run.stepper.column_state = ckpt.load_rank_state(chosen, run.accelerator.process_index, run.accelerator.device)
    run.reporter.truncate_after(run.state.step)
    run.reporter.print(f"resumed from {chosen} at step {run.state.step}")
    run.resumed = True
