"""The Accelerator for a launch, and the DeepSpeed settings the training config owns.

Launch facts this encodes (shared/notes/engine-facts.md): on CPU, multi-process needs gloo and
``Accelerator(cpu=True)`` (else two rank-0-of-1 processes), but ``cpu=True`` silently drops
DeepSpeed; Accelerate ignores fp16 on CPU; DeepSpeed clips gradients at 1.0 unless told
otherwise, and cannot fill ``train_micro_batch_size_per_gpu`` without a prepared DataLoader.
"""

from __future__ import annotations

import contextlib
import os

import torch

from mtbert.config.schema import per_task as is_per_task
from mtbert.errors import ConfigError
from mtbert.optim.loss_scaler import LossScaler


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else -1


def make_accelerator(cfg):
    """-> (accelerator, autocast factory or None, LossScaler or None)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    deepspeed = using_deepspeed()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # mtbert applies FSDP2 itself
    precision = cfg.train.precision if cfg.train.precision != "auto" else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if deepspeed and cfg.train.idle_params == "keep":
        raise ConfigError("train.idle_params=keep: DeepSpeed's ZeRO optimizers step every parameter (a zero "
                          "gradient still moves AdamW's moments); use step or auto under DeepSpeed")
    if cfg.train.idle_params == "auto":
        cfg.train.idle_params = "step" if deepspeed else "keep"
    # fp16 is mtbert's on every device and engine (docs/fp16.md): torch.autocast(float16) with fp32
    # weights and mtbert's dynamic loss scale (optim/loss_scaler.py), whose overflow decision comes
    # from all-reduced values (the Gram diagonal, the global gradient norm), so every rank skips
    # the same steps. Accelerate is told "no": its GradScaler (GPU only; on CPU it silently runs
    # fp32) cannot see the per-task rows, and DeepSpeed's fp16 engine holds fp16 weights.
    fp16 = precision == "fp16"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=leaves_parameters_idle(cfg))]
    if not cuda and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or deepspeed):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # else DeepSpeed on CPU asks for NCCL/oneCCL
    if deepspeed and not cuda:
        skip_deepspeed_cpu_shm_build()
    with _accelerate_fsdp_off(fsdp):
        accelerator = Accelerator(cpu=not cuda and not deepspeed, mixed_precision="no" if fp16 else precision,
                                  kwargs_handlers=handlers, log_with="wandb" if cfg.log.wandb else None,
                                  gradient_accumulation_steps=1,  # mtbert accumulates itself (engines/)
                                  step_scheduler_with_optimizer=False)  # else it steps N times on N processes
    if fsdp:
        from mtbert.distributed.engines.fsdp2 import mark
        mark(accelerator)
    if fp16 and deepspeed:
        _refuse_deepspeed_fp16(accelerator.state.deepspeed_plugin.deepspeed_config)
    if zero_stage(accelerator) == 3:
        _refuse_unproved_zero3(cfg, accelerator.state.deepspeed_plugin.deepspeed_config)
    if accelerator.num_processes > 1:
        refuse_unproved_new_method(cfg, zero_stage(accelerator), fsdp, "fp16" if fp16 else accelerator.mixed_precision)
    device = accelerator.device.type
    autocast = (lambda: torch.autocast(device, dtype=torch.float16)) if fp16 else None
    return accelerator, autocast, LossScaler(cfg.train.fp16_loss_scale) if fp16 else None


def skip_deepspeed_cpu_shm_build() -> None:
    """DeepSpeed on CPU builds its shared-memory all-reduce when its communication starts
    (deepspeed/comm/torch.py: ``TorchBackend.__init__`` -> ``build_shm_op``): a C++ extension
    compiled by the JIT op builder, 46 s on this 2-core machine whenever it is not cached (every CI
    run), and a compiler required. Only ``inference_all_reduce`` (DeepSpeed's tensor-parallel
    inference) calls it; ZeRO's collectives are torch.distributed's on gloo. DeepSpeed keeps which
    ops can be built in ``deepspeed.ops.__compatible_ops__`` (a dict whose edits persist,
    deepspeed/ops/__init__.py); marked incompatible, ``build_shm_op`` returns None and builds nothing."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


# The methods of issue 25 are proved on several processes (tests/equivalence_design.py, FAMILY) with
# round-robin fp32 steps and no option of the design's other factors, on these engines only.
NEW_METHODS = {"fairgrad", "config", "pcd", "sdmgrad", "modo", "cr_mogm", "gradnorm", "krum", "trimmed_mean",
               "graddrop", "excess_mtl", "moco", "db_mtl", "gls", "stch"}
COORDINATE_WISE = {"trimmed_mean", "graddrop", "excess_mtl", "moco", "db_mtl"}  # also proved on FSDP2


def refuse_unproved_new_method(cfg, stage: int, fsdp: bool, precision: str) -> None:
    """Refused before any work, naming the fields: what the matrix has not yet run them with."""
    m = cfg.method.name
    if m not in NEW_METHODS:
        return
    from mtbert.config.schema import Config
    d = Config()
    fields = [f for f, unproved in (
        ("train.schedule", cfg.train.schedule != d.train.schedule),
        ("train.grad_accum", cfg.train.grad_accum != 1),
        ("train.precision", precision != "no"),
        ("method.pairwise", cfg.method.pairwise), ("method.arrp_batches", cfg.method.arrp_batches != 0),
        ("method.smart", cfg.method.smart), ("model.sharing", cfg.model.sharing != d.model.sharing),
        ("train.train_tasks", bool(cfg.train.train_tasks)), ("train.ema_decay", cfg.train.ema_decay != 0),
        ("the launch's engine (ZeRO-1)", stage == 1),
        ("the launch's engine (FSDP2)", fsdp and m not in COORDINATE_WISE)) if unproved]
    if fields:
        raise ConfigError(f"method.name={m} on several processes is proved with round-robin fp32 steps on DDP, ZeRO-2, "
                          f"ZeRO-3{' and FSDP2' if m in COORDINATE_WISE else ''} only; not yet with "
                          f"{', '.join(fields)} (docs/method-family.md); run 1 process or leave them at their defaults")


def _refuse_deepspeed_fp16(ds_config: dict) -> None:
    """Under DeepSpeed, fp16 runs as mtbert's autocast + loss scale over an fp32 engine; a
    DeepSpeed config that turns DeepSpeed's own fp16 engine on would scale twice."""
    enabled = (ds_config.get("fp16") or {}).get("enabled", "auto")
    if enabled is True or str(enabled).lower() == "true":
        raise ConfigError('train.precision=fp16: the DeepSpeed config sets "fp16": {"enabled": true}; mtbert runs '
                          'fp16 itself (autocast and its own loss scale over fp32 weights): set it to "auto"')


def leaves_parameters_idle(cfg) -> bool:
    """Whether a step can leave some parameter without a gradient (a head of a task the step
    does not train, an encoder frozen by ARRP's head-only batches)."""
    t, m = cfg.train, cfg.method
    return t.schedule != "round_robin" or m.pairwise or m.arrp_batches > 0 or bool(t.train_tasks)


def _refuse_unproved_zero3(cfg, ds_config: dict) -> None:
    """ZeRO-3 set-ups that are not equal to one process, each for a reason in the engine's code.
    Idle parameters (a step without some task) are equal since distributed/engines/zero3.py clears the
    gradient partitions after every step (docs/zero3-idle-parameters.md); that needs the
    partitions on the device, so optimizer offload is refused with per-task methods or idle
    parameters."""
    m = cfg.method
    offload = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", None) and (is_per_task(m.name) or leaves_parameters_idle(cfg)):
        raise ConfigError("zero_optimization.offload_optimizer: with per-task methods or steps that leave parameters "
                          "idle, mtbert reads and clears ZeRO-3's gradient partitions (grad_partitions_flat_buffer), "
                          "which optimizer offload bypasses at the accumulation boundary for the parameters a step "
                          "used (deepspeed/runtime/zero/stage3.py: partition_grads, "
                          "_offload_grad_partition_at_boundary); turn optimizer offload off")


@contextlib.contextmanager
def _accelerate_fsdp_off(fsdp: bool):
    """An FSDP launch (accelerate_configs/fsdp2.yaml): Accelerate must not build its FSDP plugin
    (on CPU it drops it anyway; on GPUs its wrapping would hide the shards mtbert's engine reads),
    so ACCELERATE_USE_FSDP reads false while the Accelerator is built; mtbert shards the model
    itself (distributed/engines/fsdp2.py). The environment is restored: a later run in this process sees it."""
    if not fsdp:
        yield
        return
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        os.environ["ACCELERATE_USE_FSDP"] = "true"


def configure_deepspeed(accelerator, cfg) -> None:
    """Make the training config the single source of truth for DeepSpeed's batch and clipping."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    # mtbert owns accumulation and marks the boundary itself (engines.DeepSpeedEngine), so the
    # engine must neither divide losses by its own count nor step only every grad_accum calls.
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.data.batch_size * accelerator.num_processes
    ds["gradient_clipping"] = float(cfg.train.grad_clip)  # 0.0 = off; DeepSpeed's own default is 1.0
    ds.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW
