"""How a training process lives and dies: stop requests from the first instant, death with the
launcher, file-size limits as errors. Standard library only: ``guard_process`` runs before
torch is imported (importing torch and loading a model take seconds to minutes, and a signal
in that window used to kill the process with nothing saved and no requeue).

- SIGTERM / SIGUSR1 (Slurm's preemption warning, ``scancel --signal``, a job-wide TERM) are
  *stop requests*: recorded at once, turned into Accelerate's trigger by ``connect`` once the
  Accelerator exists, honoured at the next step boundary with a checkpoint (train.py).
- SIGINT (Ctrl-C; on several ranks the launcher passes it on to every rank) is a stop request
  too, ending with exit 130 and a line saying how to resume; a second one stops at once, with
  one line and no traceback. Only in a process that called ``guard_process`` (the command
  line, a launched rank): a run inside another program (a test, a notebook) keeps Python's
  KeyboardInterrupt.
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
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
_PR_SET_PDEATHSIG = 1
_requested: list[int] = []  # stop signals received (SIGINT: every one; the others before the Accelerator)
_guarded: list[bool] = []  # guard_process ran: this process owns its signals


def _record(signum, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _requested:
        _stop_now()
    _requested.append(signum)


def _stop_now() -> None:
    """A second Ctrl-C: no checkpoint, no traceback."""
    os.write(2, b"interrupted again: stopping now without a checkpoint; run the same command to resume from "
                b"the newest complete checkpoint\n")
    os._exit(EXIT_INTERRUPTED)


def interrupted() -> bool:
    """Whether a Ctrl-C (SIGINT) asked this process to stop."""
    return signal.SIGINT in _requested


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
    _guarded.append(True)
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, _record)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    die_with_launcher()


def connect(accelerator) -> None:
    """From now on a stop signal sets Accelerate's trigger, which ``check_trigger`` reduces over
    ranks so that all stop at the same step; a request recorded during start-up is passed on
    (``_requested`` is cleared for the next run in this process, mtbert.training.multirun's)."""
    def stop(signum, frame):
        if signum == signal.SIGINT:
            _record(signum, frame)  # a second one stops at once
        accelerator.set_trigger()
    for sig in (*STOP_SIGNALS, signal.SIGINT) if _guarded else STOP_SIGNALS:
        signal.signal(sig, stop)
    if _requested:
        accelerator.set_trigger()


def forget_requests() -> None:
    """A run that honoured its stop request is over: the next run in this process starts clean."""
    _requested.clear()


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
