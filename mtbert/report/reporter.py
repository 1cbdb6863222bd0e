"""Where run output goes: console, ``metrics.jsonl`` and (optionally) W&B trackers.

The main-process check lives here and nowhere else: every other module calls ``Reporter``
methods on every rank, and only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def check_wandb_ready(log_cfg) -> None:
    """With ``log.wandb=true``, refuse before any work when W&B could not log: not installed,
    or online without a login (wandb would fail only after the model and data are loaded)."""
    if not log_cfg.wandb:
        return
    import importlib.util

    from mtbert.errors import ConfigError
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb: the wandb package is not installed (pip install wandb), or set log.wandb=false")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC") or None).authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError(f"log.wandb: no W&B login for {host}: run `wandb login` (or set WANDB_API_KEY), "
                      "or log offline with WANDB_MODE=offline (sync later with `wandb sync`)")


class Reporter:
    def __init__(self, accelerator, run_dir: Path, cfg_dict: dict, use_wandb: bool, log_cfg=None):
        self.accelerator, self.run_dir, self.main = accelerator, run_dir, accelerator.is_main_process
        self.t0 = time.time()
        self.wandb = use_wandb
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = run_dir / "config.json.tmp"
            tmp.write_text(json.dumps(cfg_dict, indent=2))
            os.replace(tmp, run_dir / "config.json")
        if use_wandb:  # Accelerate creates the W&B run on rank 0 only
            init = {"wandb": {"name": log_cfg.name or run_dir.name, "group": log_cfg.group or None,
                              "tags": list(log_cfg.tags) + [cfg_dict["method"]["name"]],
                              "dir": str(run_dir)}}
            accelerator.init_trackers(log_cfg.project, config=cfg_dict, init_kwargs=init)

    def print(self, *args) -> None:
        if self.main:
            print(*args, flush=True)

    def log(self, record: dict) -> None:
        """One JSON line, appended whole and flushed (a crash never leaves half a line)."""
        record = {k: _plain(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self.t0, 3))
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.wandb:
            flat = {f"{record.get('split', 'train')}/{k}": v for k, v in record.items()
                    if isinstance(v, (int, float)) and k not in ("step",)}
            self.accelerator.log(flat, step=record.get("step"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they are about to be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if self.main and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    def mark_stopped(self, step: int) -> None:
        """Touch $MTBERT_STOP_FILE (set by slurm/common.sh): 'stopped to be resumed, requeue me'."""
        flag = os.environ.get("MTBERT_STOP_FILE")
        if self.main and flag:
            Path(flag).write_text(f"{step}\n")

    def write_json(self, name: str, data) -> None:
        if self.main:
            tmp = self.run_dir / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, self.run_dir / name)

    def close(self) -> None:
        """Finish the trackers and leave the process group (every rank, after a barrier: a rank
        that exits with the group alive can abort in gloo's teardown while others still talk)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
