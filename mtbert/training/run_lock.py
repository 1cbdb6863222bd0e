"""One run directory, one run: the main process of a launch holds an exclusive lock for the whole
run, so a second launch into the same ``train.out_dir`` (an ``sbatch`` submitted twice, a second
terminal) stops before it writes anything, naming the other run's host and pid.

The lock is ``fcntl.flock`` on ``.<name>.lock`` beside the run directory (not inside it: a fresh
start moves an old run directory aside, and a lock inside would move with it). The kernel
releases it when the holder dies, so a SIGKILLed run or a preempted job leaves no stale lock and
its resume or requeue takes it again. Linux's NFS client implements ``flock`` with the server's
byte-range locks (NFSv4, or NFSv3 with lockd), GPFS and BeeGFS support it, Lustre with its
``flock`` mount option; on a file system that has no locks (Lustre mounted ``noflock``, some
FUSE file systems) ``flock`` fails with ENOLCK/EOPNOTSUPP/ENOSYS: the run then prints a warning
and goes on without the protection.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mtbert.errors import ConfigError

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir).absolute()
    return run_dir.parent / f".{run_dir.name}.lock"


class RunLock:
    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, warn=print) -> RunLock:
        """Take the run directory's lock, or raise ConfigError naming the run that holds it."""
        path = lock_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise ConfigError(f"train.out_dir: {Path(run_dir)} is in use by another run (host {holder.get('host', '?')}, "
                              f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}; lock {path}); "
                              f"wait for it to end or stop it, or give another train.out_dir") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            os.close(fd)
            warn(f"warning: the file system of {path.parent} has no file locks ({os.strerror(e.errno)}): a second "
                 f"launch into {run_dir} would not be stopped")
            return cls(path, None)
        os.ftruncate(fd, 0)  # ours now: say who holds it
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}).encode())
        os.fsync(fd)
        return cls(path, fd)

    def release(self) -> None:
        """Let go (a run over in a process that goes on: mtbert.training.multirun's next run)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}
