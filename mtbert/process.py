"""How a training process lives and dies: stop requests from the first instant, death with the
launcher, file-size limits as errors. Standard library only: ``guard_process`` runs before
torch is imported (importing torch and loading a model take seconds to minutes, and a signal
in that window used to kill the process with nothing saved and no requeue).

- SIGTERM / SIGUSR1 (Slurm's preemption warning, ``scancel --signal``, a job-wide TERM) are
  *stop requests*: recorded at once, turned into Accelerate's trigger by ``connect`` once the
  Accelerator exists, honoured at the next step boundary with a checkpoint (train.py).
- A rank started by torch elastic (``accelerate launch`` with several processes) runs in its
  own session, so killing the launcher's process group does not reach it: an OOM killer or a
  node agent that SIGKILLs the launcher used to leave ranks training and writing checkpoints
  that race a relaunch. ``PR_SET_PDEATHSIG`` makes the kernel SIGKILL the rank when the
  launcher dies (checkpoints are atomic, so the newest complete one survives).
- SIGXFSZ (a file-size limit reached) kills by default; ignored, the write raises OSError
  (EFBIG) and the checkpoint code stops every rank with a message instead.
- ``leave``: the one way a process of a launch that had a process group ends (the trainer,
  the test and bench helpers under torchrun or accelerate launch): streams flushed, then
  ``os._exit``, never Python's interpreter finalization (see its docstring).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import NoReturn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1
_requested: list[int] = []  # stop signals received before the Accelerator existed


def _record(signum, frame) -> None:
    _requested.append(signum)


def die_with_launcher() -> bool:
    """Under torch elastic (TORCHELASTIC_RUN_ID is set for its workers): SIGKILL this process
    when its parent, the launcher, dies. -> whether the guard is in place."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the guard was set: nobody to train for
        os._exit(1)
    return True


def guard_process() -> None:
    """First thing a training process does (before heavy imports)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    die_with_launcher()


def connect(accelerator) -> None:
    """From now on a stop signal sets Accelerate's trigger, which ``check_trigger`` reduces over
    ranks so that all stop at the same step; a request recorded during start-up is passed on."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: accelerator.set_trigger())
    if _requested:
        accelerator.set_trigger()


def leave(code: int) -> NoReturn:
    """End this process with ``code`` after its process group was torn down (barrier,
    ``destroy_process_group``), without Python's interpreter finalization.

    Why: DDP's reducer, DeepSpeed and FSDP keep their own references to the gloo process group,
    so the C++ group and the work objects its threads hold outlive ``destroy_process_group`` and
    are freed during finalization, where freeing a tensor that needs the GIL aborts the process
    ("terminate called without an active exception", SIGABRT) after its work was done: seen in
    CI for a trainer rank (2026-12-02) and for the FSDP2 test helper (2 of 9 runs, 2026-12-07);
    pytorch/pytorch#179291 describes the same abort. Every output file is closed when it is
    written, so only logging and the standard streams need flushing."""
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)
