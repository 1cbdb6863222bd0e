"""The trainer with a fault injected: the task loss is NaN on the loss calls listed in
$MTBERT_TEST_NAN_CALLS (1-based, counted per process; "12-" = from call 12 on), on the
ranks in $MTBERT_TEST_NAN_RANKS (default: all). Launched by tests with accelerate launch."""

import os
import sys

from mtbert.model.heads import TaskHead
from mtbert.train import main

spec = os.environ["MTBERT_TEST_NAN_CALLS"]
ranks = os.environ.get("MTBERT_TEST_NAN_RANKS", "")
rank = os.environ.get("RANK", "0")
real, calls = TaskHead.loss, {"n": 0}


def broken(n: int) -> bool:
    if ranks and rank not in ranks.split(","):
        return False
    if spec.endswith("-"):
        return n >= int(spec[:-1])
    return n in {int(x) for x in spec.split(",")}


def flaky(self, out, y):
    calls["n"] += 1
    loss = real(self, out, y)
    return loss * float("nan") if broken(calls["n"]) else loss


TaskHead.loss = flaky
sys.exit(main())
