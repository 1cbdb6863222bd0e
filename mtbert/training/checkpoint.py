"""Resumable checkpoints that survive kills, corruption and full disks; the best model's weights.

A checkpoint is a folder ``checkpoints/step_<N>`` written by ``accelerator.save_state`` (model,
optimizer, scheduler, grad scaler, every process's RNG states; DeepSpeed engines included),
plus ``trainer_state.json`` (step, sampler positions, log window, the run's settings) and, last,
``manifest.json`` (size and SHA-256 of every file). Life of a save:

1. every rank writes into ``.tmp_step_<N>``; a write error (disk
   full, file-size limit, I/O error) on any rank raises ``CheckpointWriteError`` — train.main
   prints it and exits that rank at once, and the launcher stops the others (a collective to
   agree would deadlock inside DeepSpeed's own save barriers);
2. after a barrier the main process fsyncs every file, writes the trainer state and the
   manifest, fsyncs them and the folder, and renames the folder into place (an existing ``step_<N>`` is first
   renamed to ``.replaced_step_<N>``, so a kill between the two renames still leaves a
   complete checkpoint to resume), fsyncs ``checkpoints/``, then prunes to ``keep_last``.

A checkpoint counts only if its manifest exists; on resume the newest one whose files match
their manifest is used and each corrupt one is reported and skipped (``newest_valid``).
Leftover temporary folders are removed by the main process before each save and on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_NAME = re.compile(r"(?:\.replaced_)?step_(\d+)")


class CheckpointWriteError(OSError):
    """A checkpoint or weights folder could not be written; the previous checkpoint is intact."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk (a rename is only
    durable once the data it points to is)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_durably(folder / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify(folder: Path) -> str | None:
    """None if every file matches the manifest; else what is wrong (for the user)."""
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for rel, want in entries.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest"
    return None


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (manifest written), oldest first. ``.replaced_step_N`` stands in
    for ``step_N`` only when a kill came between the two renames of a same-step save."""
    root = run_dir / "checkpoints"
    by_step: dict[int, Path] = {}
    for p in sorted(root.glob("*step_*"), key=lambda p: p.name.startswith(".")):  # step_N first
        m = _NAME.fullmatch(p.name)
        if m and (p / MANIFEST).exists():
            by_step.setdefault(int(m.group(1)), p)
    return [by_step[s] for s in sorted(by_step)]


def newest_valid(run_dir: Path, report) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their manifest, and one line per corrupt one
    that was skipped (each also passed to ``report``)."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append(f"checkpoint {path} is corrupt: {problem}; skipping it")
        report(f"warning: {skipped[-1]}")
    return None, skipped


def remove_leftovers(run_dir: Path) -> None:
    """Temporary folders of interrupted saves, and replaced folders whose successor is complete."""
    root = run_dir / "checkpoints"
    complete = {int(_NAME.fullmatch(p.name).group(1)) for p in root.glob("step_*")
                if _NAME.fullmatch(p.name) and (p / MANIFEST).exists()}
    for p in root.glob(".tmp_*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".replaced_step_*"):
        m = _NAME.fullmatch(p.name)
        if m and int(m.group(1)) in complete:
            shutil.rmtree(p, ignore_errors=True)


def _write_error(what: Path, e: Exception, rank: int) -> CheckpointWriteError:
    """Writers wrap the OS error their own way (safetensors: SafetensorError, torch.save:
    RuntimeError), so any failure while writing is one: the message keeps theirs."""
    why = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return CheckpointWriteError(f"rank {rank} could not write {what}: {why}")


def rank_file(folder: Path, rank: int) -> Path:
    """A method's per-coordinate state on one rank (its columns: only that rank has them)."""
    return folder / f"method_columns.rank{rank}.safetensors"


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep_last: int,
                    rank_state: dict | None = None) -> Path:
    """``rank_state``: tensors this rank alone holds (a method's per-coordinate state), written by
    every rank into the checkpoint beside Accelerate's files (and so into its manifest)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    main, rank = accelerator.is_main_process, accelerator.process_index
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(run_dir)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if rank_state:
            from safetensors.torch import save_file
            save_file({k: v.contiguous().cpu() for k, v in rank_state.items()}, str(rank_file(tmp, rank)))
    except Exception as e:  # see _write_error
        raise _write_error(tmp, e, rank) from e
    accelerator.wait_for_everyone()
    if main:
        try:
            fsync_tree(tmp)  # every rank's files, now closed (another rank's may still be open before)
            _write_durably(tmp / STATE_FILE, json.dumps(trainer_state))
            write_manifest(tmp)
            _fsync(tmp)
            aside = root / f".replaced_step_{step}"
            if final.exists():  # a second save at this step: never be without a complete one
                os.replace(final, aside)
            os.replace(tmp, final)
            _fsync(root)
            shutil.rmtree(aside, ignore_errors=True)
        except Exception as e:
            raise _write_error(final, e, rank) from e
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_rank_state(path: Path, rank: int, device) -> dict | None:
    """This rank's per-coordinate method state from a checkpoint, or None if it has none."""
    f = rank_file(path, rank)
    if not f.exists():
        return None
    from safetensors.torch import load_file
    return {k: v.to(device) for k, v in load_file(str(f)).items()}


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return read_trainer_state(path)


def save_weights(accelerator, model, folder: Path, info: dict) -> None:
    """Model weights (safetensors) + info.json into ``folder``, atomically and durably, by the
    main process (the gather of ZeRO-3 partitions is a collective: every rank calls this)."""
    from mtbert.distributed.engines.fsdp2 import full_state_dict, is_sharded
    state = full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)  # (collectives)
    if accelerator.is_main_process:
        from safetensors.torch import save_file
        tmp = folder.with_name(".tmp_" + folder.name)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"))
            _write_durably(tmp / "info.json", json.dumps(info))
            fsync_tree(tmp)
            aside = folder.with_name(".replaced_" + folder.name)
            if folder.exists():  # renamed, not deleted, until the new one is in place
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(folder, aside)
            os.replace(tmp, folder)
            _fsync(folder.parent)
            shutil.rmtree(aside, ignore_errors=True)
        except Exception as e:
            raise _write_error(folder, e, accelerator.process_index) from e
    accelerator.wait_for_everyone()


def load_best(model, run_dir: Path) -> dict | None:
    folder = next((f for f in (run_dir / "best", run_dir / ".replaced_best") if (f / "info.json").exists()), None)
    if folder is None:
        return None
    from safetensors.torch import load_file

    from mtbert.distributed.engines.fsdp2 import is_sharded, load_full_state_dict
    weights = load_file(str(folder / "model.safetensors"))
    if is_sharded(model):  # every rank reads the whole file and keeps its shards
        load_full_state_dict(model, weights)
    else:
        model.load_state_dict(weights)
    return json.loads((folder / "info.json").read_text())
