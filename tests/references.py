"""The equivalence matrix's 1-process references: 1 process on the global batch (12 = 2 x 6 =
3 x 4), computed once per distinct configuration for the whole test run, keyed by a hash of its
overrides. DeepSpeed steps every parameter (train.idle_params=step), so its fp32 reference runs
with that setting; under bf16 DeepSpeed holds bf16 parameters itself, so its reference is the
same DeepSpeed config launched with 1 process (one launch for all of them, each case with its
config's launch environment).

The plain references run as one ``python -m mtbert.training.multirun`` (1 process, as ``python
mtbert/train.py`` runs) started in the background when the first launch group starts: the
groups leave a core partly idle (launcher start-up, collectives), the references use it. A
reference that the background run did not produce is computed in this process instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, run_main, tiny_args
from equivalence_design import ENGINE_CONFIG, GLOBAL_BATCH, case_args, case_label, equivalence_cases
from harness import Case, launch_env, run_group

DEEPSPEED = ("zero1", "zero2", "zero3")


def deepspeed_reference(case: dict) -> str | None:
    """The engine whose 1-process launch is the reference (DeepSpeed bf16), else None (plain)."""
    return case["engine"] if case["engine"] in DEEPSPEED and case["precision"] == "bf16" else None


def reference_args(case: dict) -> list[str]:
    """The 1-process reference's overrides (no run directory): what the cache key hashes."""
    args = [*case_args(case), f"--data.batch_size={GLOBAL_BATCH}"]
    if deepspeed_reference(case) is None and "idle" not in case:  # DeepSpeed steps every parameter
        args.append(f"--train.idle_params={'step' if case['engine'] in DEEPSPEED else 'keep'}")
    return args


def reference_key(case: dict) -> str:
    return hashlib.sha256(json.dumps([deepspeed_reference(case), reference_args(case)]).encode()).hexdigest()[:16]


class References:
    def __init__(self, tiny_ckpt: Path, root: Path):
        self.ckpt, self.root, self.cache, self.background = tiny_ckpt, root, {}, None
        self.results = root / "plain-results"

    def start(self) -> None:
        """Every plain reference, in one background 1-process run (idempotent)."""
        if self.background is not None:
            return
        only = re.compile(os.environ.get("MTBERT_CASES", ""))  # a developer's subset: its references only
        todo = {reference_key(c): c for c in equivalence_cases()
                if deepspeed_reference(c) is None and only.search(case_label(c))}
        plan = self.root / "plain-plan.json"
        plan.write_text(json.dumps({"results": str(self.results), "cases": [
            {"id": k, "args": tiny_args(self.ckpt, self.root / k, *reference_args(c))} for k, c in todo.items()]}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.background = subprocess.Popen([sys.executable, "-m", "mtbert.training.multirun", str(plan)], cwd=ROOT, env=env,
                                           stdout=open(self.root / "plain.log", "w"),  # noqa: SIM115 - the process owns it
                                           stderr=subprocess.STDOUT)

    def _plain(self, key: str, case: dict) -> Path:
        self.start()
        meta = self.results / f"{key}.json"
        while not meta.exists() and self.background.poll() is None:
            time.sleep(0.05)
        if meta.exists():
            code = json.loads(meta.read_text())["code"]
            assert code == 0, f"reference of {case_label(case)}: exit {code}\n" + \
                (self.results / f"{key}.rank0.log").read_text()[-4000:]
        else:  # the background run ended without it: here, in this process
            assert run_main(tiny_args(self.ckpt, self.root / key, *reference_args(case))) == 0, \
                f"reference of {case_label(case)}"
        return self.root / key

    def _deepspeed(self, case: dict) -> None:
        """Every DeepSpeed bf16 reference in one 1-process launch (a DeepSpeed config: torchrun
        starts it), each with its own config's environment."""
        todo = {reference_key(c): c for c in equivalence_cases() if deepspeed_reference(c)}
        cases = [Case(k, tiny_args(self.ckpt, self.root / k, *reference_args(c)), {},
                      launch_env(ENGINE_CONFIG[c["engine"]], 1)) for k, c in todo.items()]
        results = run_group(ENGINE_CONFIG["zero1"], 1, cases, self.root / "deepspeed-1-results")
        for k, r in results.items():
            assert r.code == 0, f"reference {k} ({todo[k]['engine']}, 1 process):\n{r.log[-4000:]}"
            self.cache[k] = self.root / k

    def __call__(self, case: dict) -> Path:
        """case -> the run directory of its 1-process reference."""
        key = reference_key(case)
        if key not in self.cache:
            if deepspeed_reference(case):
                self._deepspeed(case)
            else:
                self.cache[key] = self._plain(key, case)
        return self.cache[key]
