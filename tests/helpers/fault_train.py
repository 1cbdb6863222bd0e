"""The trainer with a kill injected at a chosen moment of a checkpoint save, in this process
(SIGKILL: no handler, no cleanup — what an OOM killer or a node failure does):

  MTBERT_TEST_FAULT=in_save_state:<step>    inside accelerator.save_state of step <step>, after
                                            the model file and before the optimizer's
  MTBERT_TEST_FAULT=between_renames:<step>  a stop request (SIGUSR1) arrives just as the periodic
                                            checkpoint of <step> is written, so the stop saves
                                            <step> again; killed after the complete step_<step>
                                            was renamed aside and before the new one took its name
"""

import os
import signal
import sys

import mtbert.training.checkpoint as ckpt
from mtbert.train import main

where, step = os.environ["MTBERT_TEST_FAULT"].split(":")
step = int(step)


def die(*_):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if where == "in_save_state":
    import accelerate.checkpointing as acp
    real_save = acp.save

    def save(obj, path, *a, **k):
        if f".tmp_step_{step}" in str(path) and "optimizer" in os.path.basename(str(path)):
            die()
        return real_save(obj, path, *a, **k)
    acp.save = save
elif where == "between_renames":
    real_replace, real_checkpoint = os.replace, ckpt.save_checkpoint
    saves = {"n": 0}

    def replace(src, dst):
        real_replace(src, dst)
        if os.path.basename(str(dst)) == f".replaced_step_{step}":
            die()

    def save_checkpoint(accelerator, run_dir, at, *a, **k):
        out = real_checkpoint(accelerator, run_dir, at, *a, **k)
        if at == step:
            os.kill(os.getpid(), signal.SIGUSR1)  # the stop: save `step` a second time
        return out
    os.replace = replace  # (only the rename to .replaced_step_<step> dies; every other passes through)
    ckpt.save_checkpoint = save_checkpoint
else:
    raise SystemExit(f"unknown MTBERT_TEST_FAULT {where!r}")

if __name__ == "__main__":
    from mtbert.training import process
    process.guard_process()
    sys.exit(main())
