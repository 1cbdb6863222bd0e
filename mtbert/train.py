"""Multitask BERT fine-tuning: setup -> fit -> finish.

    accelerate launch mtbert/train.py                       # packaged sample data, minutes on CPU
    accelerate launch mtbert/train.py --preset recipe       # the real CS224N files
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml mtbert/train.py --method.name=pcgrad

- ``setup``: config -> Accelerator, model, data, sampler, phases, optimizer, Stepper, resume.
- ``fit``: the phases, step by step: plan -> this rank's micro-batches -> ``Stepper.step`` ->
  log / evaluate / checkpoint / stop on a signal.
- ``finish``: final weights, replica check, the best checkpoint's predictions, summary.json.
Everything distributed goes through Accelerate (``accelerator.prepare``), the engines
(engines/) and the collectives (collectives.py); the model code knows nothing of it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from mtbert.training import process

if __name__ == "__main__":  # before the heavy imports: a stop request during start-up is kept
    process.guard_process()

import torch

from mtbert.config.cli import parse_args
from mtbert.config.schema import Config, to_dict
from mtbert.data.sampler import ShardedTaskSampler, plan_step
from mtbert.distributed.accelerator import make_accelerator, zero_stage
from mtbert.distributed.collectives import Collectives, destroy_process_group, process_group_exists
from mtbert.distributed.engines.fsdp2 import marked
from mtbert.distributed.replicas import ranks_agree
from mtbert.errors import EXIT_USER_ERROR, ConfigError, UserError
from mtbert.methods.phases import Phase, build_phases
from mtbert.report.reporter import Reporter, check_wandb_ready
from mtbert.training import checkpoint as ckpt
from mtbert.training import limits
from mtbert.training.build import build_model, load_data, prepare_training
from mtbert.training.evaluate import evaluate, predict, write_predictions
from mtbert.training.resume import choose_checkpoint, prepare_run_dir, resume_run, run_settings, save_run
from mtbert.training.run import LogWindow, Run, global_mean_losses
from mtbert.training.run_lock import RunLock
from mtbert.training.step import MicroBatch, Stepper
from mtbert.training.weight_average import Fsdp2Shards, WeightAverage, Zero3Partitions, evaluated_weights

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after writing a checkpoint; requeue me
EXIT_NUMERICS = 3  # too many non-finite steps in a row
EXIT_IO = 74  # EX_IOERR: a checkpoint could not be written (the previous one is intact)


# ---- setup ---------------------------------------------------------------------------------

def setup(cfg: Config, accelerator, autocast, scaler) -> Run:
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    coll = Collectives(world, device, rank=rank)  # every torch.distributed call goes through it
    engine = (f"{accelerator.distributed_type.value}/zero{zero_stage(accelerator)}/{accelerator.mixed_precision}"
              + ("/fsdp2" if marked(accelerator) else ""))
    settings = run_settings(json.loads(json.dumps(to_dict(cfg))), world, engine)
    lock = lock_run_dir(cfg, accelerator, coll)  # before anything is written: a second launch stops here
    try:
        return build_run(cfg, accelerator, autocast, scaler, coll, settings, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def lock_run_dir(cfg: Config, accelerator, coll: Collectives) -> RunLock | None:
    """The main process takes the run directory's lock (run_lock.py); every rank learns whether it
    could, and all stop alike (exit 2) when another run holds it."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(Path(cfg.train.out_dir), warn=lambda m: print(m, flush=True))
        except ConfigError as e:
            refused = str(e)
    refused = coll.gather_objects(refused)[0]
    if refused:
        raise ConfigError(refused)
    return lock


def build_run(cfg: Config, accelerator, autocast, scaler, coll: Collectives, settings: dict, lock) -> Run:
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    # A refused resume leaves the run directory untouched.
    moved = prepare_run_dir(Path(cfg.train.out_dir), cfg.train.resume, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    chosen = choose_checkpoint(Path(cfg.train.out_dir), cfg.train.resume, settings, accelerator.is_main_process, coll)
    reporter = Reporter(accelerator, Path(cfg.train.out_dir), to_dict(cfg), cfg.log.wandb, cfg.log)
    if moved:
        reporter.print(moved)
    from accelerate.utils import set_seed
    set_seed(cfg.train.seed)
    module, folder, specs, sizes = build_model(cfg, reporter, world, device)
    train, dev, test = load_data(cfg, specs, module, folder, reporter)
    B = cfg.data.batch_size
    sampler = ShardedTaskSampler({t: s.lengths() for t, s in train.items()}, cfg.train.seed, world, rank,
                                 B, cfg.data.bucket)
    limits.check_batch(cfg, {t: len(s) for t, s in train.items()}, world)
    phases = build_phases(cfg, {t: max(1, s.batches_per_epoch()) for t, s in sampler.streams.items()})
    total = sum(p.steps for p in phases)
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    reporter.print(f"{len(phases)} phase(s), {total} steps; global batch {B * world} per task")

    model, optimizer, scheduler = prepare_training(accelerator, module, cfg, total, coll, reporter)
    stepper = Stepper(accelerator, model, optimizer, scheduler, cfg, list(specs), coll, autocast, scaler)
    run = Run(cfg, accelerator, reporter, coll, specs, stepper.module, model, train, dev, test, sampler, phases,
              total, scheduler, stepper, autocast, scaler, sizes=sizes, settings=settings, lock=lock)
    if cfg.train.ema_decay:  # registered before the resume: load_state restores it
        layout = (Zero3Partitions(coll) if zero_stage(accelerator) == 3 else Fsdp2Shards(coll) if marked(accelerator)
                  else None)  # each rank averages its part of each parameter
        run.average = WeightAverage(run.module, cfg.train.ema_decay, layout)
        accelerator.register_for_checkpointing(run.average)
    resume_run(run, chosen)
    process.connect(accelerator)  # SIGTERM / SIGUSR1 -> checkpoint and exit at the next step boundary
    return run


# ---- fit -----------------------------------------------------------------------------------

def evaluate_dev(run: Run, label: str) -> None:
    """Dev metrics -> metrics.jsonl and the console; a new best overall saves best/."""
    step = run.state.step
    with evaluated_weights(run.average):  # the weight average when train.ema_decay > 0
        evaluate_and_keep_best(run, label, step)


def evaluate_and_keep_best(run: Run, label: str, step: int) -> None:
    metrics, overall, _ = evaluate(run.module, run.dev, run.specs, run.cfg.data.eval_batch_size,
                                   run.accelerator.device, run.autocast, run.collectives,
                                   run.accelerator.process_index)
    record = {"step": step, "split": "dev", "phase": label, "examples": run.state.examples, "overall": overall}
    record.update({f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items()})
    run.reporter.log(record)
    run.reporter.print(f"[dev] step {step} ({label}): overall {overall:.4f} | " +
                       " ".join(f"{t} {v:.4f}" for t, m in metrics.items() for k, v in m.items() if k != "score"))
    if overall > run.state.best:
        run.state.best = overall
        ckpt.save_weights(run.accelerator, run.model, run.run_dir / "best",
                          {"step": step, "overall": overall, "metrics": metrics})


def micro_batches(run: Run, phase: Phase, window: LogWindow) -> list[MicroBatch]:
    """This rank's ``grad_accum`` micro-batches of the current step."""
    cfg, world = run.cfg, run.collectives.world
    active = {t: len(run.train[t]) for t in phase.tasks}
    out = []
    for a in range(cfg.train.grad_accum):
        # The plan counts examples of the global batch (B x world): world-independent.
        plan = plan_step(cfg.train.schedule, cfg.train.seed, run.state.step * cfg.train.grad_accum + a, active,
                         cfg.data.batch_size * world, phase.epoch, cfg.train.epochs, cfg.train.temperature)
        idx = run.sampler.next(plan, union=cfg.train.schedule == "union")
        shares = {t: len(idx[t]) * world / n for t, n in plan.items()}
        idx = {t: i or run.sampler.placeholder(t) for t, i in idx.items()}  # share 0: see MicroBatch
        out.append(MicroBatch({t: run.train[t].batch(i, run.accelerator.device) for t, i in idx.items()}, shares))
        window.examples += sum(plan.values())
        run.state.examples += sum(plan.values())
        window.tokens += sum(run.train[t].token_count(i) for t, i in idx.items() if shares[t]) * world
    return out


def log_train(run: Run, phase: Phase, window: LogWindow) -> LogWindow:
    """Write the window's train metrics line; return a fresh window."""
    dt = time.time() - window.t0
    record = {"step": run.state.step, "split": "train", "phase": phase.label, "epoch": phase.epoch,
              "examples": run.state.examples, "lr": run.scheduler.get_last_lr()[0], "examples_per_s": window.examples / dt,
              "tokens_per_s": window.tokens / dt}
    global_mean_losses(window.stats, run.collectives)
    for k, vs in window.stats.items():
        vals = [float(v) for v in vs]
        record[k] = sum(vals) if k in ("skipped", "comm_bytes") else sum(vals) / len(vals)
    if run.average is not None:
        record["ema_gap"] = run.average.gap()
    run.reporter.log(record)
    return LogWindow()


def train_phase(run: Run, phase: Phase, phase_end: int, bar) -> int:
    """Steps until the phase ends; -> 0, or the exit code that stops the run."""
    cfg, state = run.cfg, run.state
    run.module.train()
    while state.step < phase_end:
        window = run.window
        stats = run.stepper.step(state.step, micro_batches(run, phase, window), phase)
        state.step += 1
        if run.average is not None and not stats.get("skipped"):
            run.average.update()
        bar.update(1)
        state.bad_streak = state.bad_streak + 1 if stats.get("skipped") else 0
        for k, v in stats.items():
            window.stats.setdefault(k, []).append(v)
        if state.step % cfg.train.log_every == 0 or state.step == phase_end:
            run.window = log_train(run, phase, window)
        if state.bad_streak >= cfg.train.max_bad_steps:
            run.reporter.print(f"error: {state.bad_streak} steps in a row had a non-finite loss or gradient "
                               f"(step {state.step}); stopping. The last good checkpoint in "
                               f"{run.run_dir / 'checkpoints'} is intact; lower train.lr or check the data.")
            return EXIT_NUMERICS
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < phase_end:
            evaluate_dev(run, phase.label)
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0 and state.step < phase_end:
            save_run(run)  # (a phase end saves after its evaluation, in fit)
        code = stop_requested(run)
        if code:
            return code
    return 0


def stop_requested(run: Run) -> int:
    """A stop request on any rank (process.py: SIGTERM/SIGUSR1, or Ctrl-C): all ranks checkpoint at
    this step boundary. -> 0 (go on), EXIT_PREEMPTED, or EXIT_INTERRUPTED after a Ctrl-C. The stop
    file is written before the last barrier, so no rank exits (and no launcher fails the job step,
    e.g. srun --kill-on-bad-exit) before the requeue marker exists; a Ctrl-C writes none (the person
    who pressed it does not want a requeue)."""
    if not run.accelerator.check_trigger():
        return 0
    save_run(run)
    step = run.state.step
    if process.interrupted():
        run.reporter.print(f"interrupted: checkpoint at step {step} written in {run.run_dir / 'checkpoints'}; run "
                           f"the same command to resume (exit {process.EXIT_INTERRUPTED})")
        code = process.EXIT_INTERRUPTED
    else:
        run.reporter.print(f"stop requested: checkpoint at step {step} written; exiting with {EXIT_PREEMPTED}")
        run.reporter.mark_stopped(step)  # launchers (accelerate, torchrun) do not pass our exit code on
        code = EXIT_PREEMPTED
    process.forget_requests()  # honoured (a next run in this process, mtbert.training.multirun's, starts clean)
    return code


def fit(run: Run) -> int:
    """Every phase to the end (or to a stop); -> 0 or the exit code."""
    cfg, state = run.cfg, run.state
    code = stop_requested(run)
    if code:  # asked during start-up (model load, tokenization): nothing to redo
        return code
    if state.step == 0 and state.evaluated < 0:  # (also after a stop during start-up)
        if cfg.train.eval_at_start:
            evaluate_dev(run, "start")
        state.evaluated = 0
    from tqdm.auto import tqdm
    bar = tqdm(total=run.total, initial=state.step, desc="train",
               disable=not (run.accelerator.is_main_process and cfg.train.progress))
    phase_end, code = 0, 0
    for phase in run.phases:
        phase_end = min(phase_end + phase.steps, run.total)
        if state.step > phase_end or (state.step == phase_end and state.evaluated >= phase_end):
            continue  # done before a resume (a stop exactly at a phase end still gets its evaluation)
        code = train_phase(run, phase, phase_end, bar)
        if code:
            break
        if phase.eval_after or state.step == run.total:
            evaluate_dev(run, phase.label)
            state.evaluated = state.step
            save_run(run)
        elif cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
            save_run(run)
        if state.step >= run.total:
            break
    bar.close()
    return code


# ---- finish --------------------------------------------------------------------------------

def finish(run: Run) -> None:
    """Final weights, replica check, the best model's dev and test predictions, summary.json."""
    accelerator, run_dir, world = run.accelerator, run.run_dir, run.collectives.world
    if run.average is not None:  # training is over: the average is the model from here on
        run.average.apply()
    ckpt.save_weights(accelerator, run.model, run_dir / "final", {"step": run.state.step})
    sharded = zero_stage(accelerator) == 3 or marked(accelerator)  # each rank holds a shard of the parameters
    agree = None if sharded else ranks_agree(run.module, run.collectives, run.stepper.method_state)
    if agree is False:
        run.reporter.print("error: the processes ended with different parameters; the launch is not data-parallel")
    info = None if zero_stage(accelerator) == 3 else ckpt.load_best(run.module, run_dir)
    for split_name, splits in (("dev", run.dev), ("test", run.test if run.cfg.train.predict_test else {})):
        for t, split in splits.items():
            if split is None:
                continue
            preds = predict(run.module, split, run.cfg.data.eval_batch_size, accelerator.device, run.autocast,
                            run.collectives, accelerator.process_index)
            if accelerator.is_main_process:
                spec = run.specs[t]
                write_predictions(run_dir / "predictions" / f"{spec.pred_name}-{split_name}-output.csv",
                                  spec.pred_header, split.ids, preds, run.module.heads[t].regression)
                if split_name == "dev" and split.labels is not None:  # mtbert.compare's paired tests read it
                    write_predictions(run_dir / "predictions" / f"{spec.pred_name}-dev-gold.csv", f"Gold_{t}",
                                      split.ids, split.labels.tolist(), run.module.heads[t].regression)
    peak_gpu = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if torch.cuda.is_available() else None
    run.reporter.write_json("summary.json", {
        "steps": run.state.step, "best": info, "wall_s": round(time.time() - run.reporter.t0, 1),
        "processes": world, "engine": run.settings.get("engine"), "params_agree_across_ranks": agree, **run.sizes,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak_gpu_mib": peak_gpu})
    run.reporter.print(f"done: best dev overall {run.state.best:.4f} at step {info['step'] if info else '?'}; "
                       f"outputs in {run_dir}")


def train(argv: list[str]) -> tuple[int, Run | None]:
    """One run in this process, start to finish: -> (exit code, the Run, or None when it was
    refused before setup). The process group, if any, stays up: ``main`` tears it down, and a
    launch that runs several configurations in turn (tests/helpers/run_cases.py) calls
    ``release`` between them."""
    try:
        cfg = parse_args(argv)
        check_wandb_ready(cfg.log)
        accelerator, autocast, scaler = make_accelerator(cfg)
        run = setup(cfg, accelerator, autocast, scaler)
    except UserError as e:  # bad config or input: every rank hits the same one
        return user_error(e), None
    try:
        code = fit(run)
        if not code:
            finish(run)
    except ckpt.CheckpointWriteError as e:
        return write_failed(run, e), run
    except UserError as e:  # found during the run (e.g. a user task's data): deterministic, on every rank
        return user_error(e), run
    return code, run


def user_error(e: UserError) -> int:
    """One line naming the field or file:line, no traceback -> exit 2."""
    print(f"{'config' if isinstance(e, ConfigError) else 'input'} error: {e}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def release(run: Run) -> None:
    """Let go of a finished run's engine (a DeepSpeed engine is destroyed), trackers and run
    directory lock, keeping the process group: the next run in this process builds its own
    Accelerator."""
    run.accelerator.wait_for_everyone()
    if run.lock is not None:
        run.lock.release()
    for tracker in run.accelerator.trackers:
        tracker.finish()
    run.accelerator.free_memory()


def main(argv: list[str] | None = None) -> int:
    """The command line. A process that joined a process group (a launch; DeepSpeed makes one
    for a single process too) ends here through ``process.leave``; one that did not returns."""
    code, run = train(sys.argv[1:] if argv is None else argv)
    had_group = process_group_exists()
    if run is not None:
        run.reporter.close()  # barrier, trackers, destroy_process_group
        if run.lock is not None:  # (the process may go on: a run inside another program)
            run.lock.release()
    else:  # refused after the Accelerator joined the group: every rank is refused alike
        destroy_process_group()
    if had_group:
        process.leave(code)
    return code


def write_failed(run: Run, e: ckpt.CheckpointWriteError) -> int:
    """A checkpoint or weights folder could not be written (disk full, quota, I/O error)."""
    found = ckpt.list_checkpoints(run.run_dir)
    print(f"error: {e}. Nothing was lost: the newest complete checkpoint is "
          f"{found[-1] if found else '(none yet)'}; free space and run the same command to resume.",
          file=sys.stderr, flush=True)
    if run.collectives.world > 1:  # the others wait in a barrier (ours or DeepSpeed's): the launcher
        process.leave(EXIT_IO)      # sees this rank fail and stops them; a clean exit could hang in teardown
    return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
