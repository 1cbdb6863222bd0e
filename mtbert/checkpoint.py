"""Resumable checkpoints (atomic, keep-last-N) and the best model's weights.

A checkpoint is a folder ``checkpoints/step_<N>`` written by ``accelerator.save_state``
(model, optimizer, scheduler, grad scaler, every process's RNG states; DeepSpeed engines
included) plus ``trainer_state.json`` (step, sampler positions, best score). It is written
under a temporary name and renamed into place only when complete, so a crash mid-save
leaves the previous checkpoint as the newest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"


def _barrier(accelerator) -> None:
    accelerator.wait_for_everyone()  # a no-op in one process


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    accelerator.save_state(str(tmp))
    _barrier(accelerator)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the atomic step: the folder appears complete or not at all
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def save_weights(accelerator, model, folder: Path, info: dict) -> None:
    """Model weights (safetensors) + info.json into ``folder``, atomically, by the main process."""
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions; collective
    if accelerator.is_main_process:
        from safetensors.torch import save_file
        tmp = folder.with_name(".tmp_" + folder.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "info.json").write_text(json.dumps(info))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _barrier(accelerator)


def load_best(model, run_dir: Path) -> dict | None:
    path = run_dir / "best" / "model.safetensors"
    if not path.exists():
        return None
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)))
    return json.loads((run_dir / "best" / "info.json").read_text())
