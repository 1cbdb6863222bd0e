"""Shared fixtures: the real data folder, a tiny random HF BERT checkpoint, run helpers."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MTBERT_DATA_DIR", ROOT.parent / "shared" / "data" / "cs224n"))
# Every other run reads the packaged sample, in CI (which exports MTBERT_DATA_DIR) as on a laptop: the
# tolerances and timings were measured there. Left in the environment, the variable silently moved every
# tiny run (and its subprocesses) onto the real files in CI only (2026-12-02: a bf16 equivalence case
# failed there and nowhere else, and the suite took 44 instead of 20 minutes). Tests that want the real
# files take the `data_dir` fixture and pass it explicitly.
os.environ.pop("MTBERT_DATA_DIR", None)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "ids-sst-train.csv").exists():
        pytest.skip(f"real CS224N files not found at {DATA} (set MTBERT_DATA_DIR)")
    return DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from mtbert.model.bert import resolve_checkpoint
    return resolve_checkpoint("minilm-l6")


def make_tiny_checkpoint(folder: Path, layers=2, hidden=32, heads=4, seed=0, **config) -> Path:
    """A random tiny HF BertModel saved in HF format, with the MiniLM tokenizer files; ``config``:
    other BertConfig fields (e.g. a vocabulary smaller than the tokenizer's)."""
    from transformers import BertConfig, BertModel

    from mtbert.model.bert import resolve_checkpoint
    torch.manual_seed(seed)
    cfg = BertConfig(**{"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
                        "num_attention_heads": heads, "intermediate_size": 4 * hidden,
                        "max_position_embeddings": 128, **config})
    BertModel(cfg).save_pretrained(folder)
    src = resolve_checkpoint("minilm-l6")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bert"))


def tiny_args(tiny_ckpt: Path, out_dir: Path, *extra: str) -> list[str]:
    """Overrides for a fast tiny run on the packaged sample data."""
    return [f"--model.checkpoint={tiny_ckpt}", f"--train.out_dir={out_dir}", "--data.batch_size=8", "--train.epochs=1",
            "--train.epoch_steps=4", "--train.progress=false", "--train.log_every=2", "--train.lr=1e-3",
            "--data.max_eval=24", *extra]


def run_main(args: list[str]) -> int:
    """Run the trainer in this process (Accelerate's state is a singleton: reset it first). What is
    alive now is frozen out of the collector's reach (as mtbert.training.multirun does per run):
    the run's closing gc.collect() then walks its own garbage, not the whole test session's."""
    import gc
    gc.collect()  # the previous run's garbage first: frozen, it would never be freed
    gc.freeze()
    from accelerate.state import AcceleratorState, GradientState, PartialState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    from mtbert.train import main
    return main(args)


def read_metrics(run_dir: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


NO_DROPOUT = ["--model.dropout=0", "--heads.sst.dropout=0", "--heads.quora.dropout=0", "--heads.sts.dropout=0"]


@pytest.fixture(scope="session")
def references(tiny_ckpt, tmp_path_factory):
    """case -> the run directory of its 1-process reference (tests/references.py)."""
    from references import References
    return References(tiny_ckpt, tmp_path_factory.mktemp("references"))


@pytest.fixture(scope="session")
def launched(tiny_ckpt, tmp_path_factory, references):
    """case (tests/equivalence_design.py: a matrix case, a refusal or a fault) -> (CaseResult, its run
    directory). The first request for a (config, processes) pair launches every case of that
    pair in one launch (tests/harness.py); later requests read the results."""
    import equivalence_design as design
    from harness import Case, launch_env, run_group
    root, groups = tmp_path_factory.mktemp("launched"), {}
    everything = design.equivalence_cases() + design.REFUSALS + design.FAULTS

    def args(case: dict, run: Path) -> list[str]:
        if "field" in case or "name" in case:  # a refusal or a fault: the overrides as a user would type them
            return tiny_args(tiny_ckpt, run, *case["args"])
        return tiny_args(tiny_ckpt, run, *design.case_args(case),
                         f"--data.batch_size={design.GLOBAL_BATCH // case['ranks']}")

    def run_of(case: dict) -> str:  # a fault case may continue another one's run directory
        return f"fault-{case['same_run']}" if "same_run" in case else design.case_label(case)

    def get(case: dict):
        only = os.environ.get("MTBERT_CASES")
        if only and not re.search(only, design.case_label(case)):
            pytest.skip(f"not in MTBERT_CASES={only}")
        key = design.launch_key(case)
        folder = root / f"ranks-{key}"
        if key not in groups:
            references.start()  # in the background, while the groups run
            engines = list(design.ENGINE_CONFIG)  # the launch runs the cases engine by engine
            only = re.compile(os.environ.get("MTBERT_CASES", ""))  # a developer's subset (docs/testing.md)
            members = sorted((c for c in everything if design.launch_key(c) == key
                              and only.search(design.case_label(c))),
                             key=lambda c: engines.index(c["engine"]))
            cases = [Case(design.case_label(c), args(c, folder / run_of(c)),
                          {k: c[k] for k in ("nan_calls", "nan_ranks", "stop_at_step") if k in c},
                          launch_env(design.ENGINE_CONFIG[c["engine"]], c["ranks"])) for c in members]
            groups[key] = run_group(design.LAUNCH_CONFIG, key, cases, folder / "results")
        label = design.case_label(case)
        return groups[key][label], folder / run_of(case)
    return get


@pytest.fixture(scope="session")
def two_rank_uninterrupted(tiny_ckpt, tmp_path_factory) -> Path:
    """A 2-rank PCGrad run of test_reliability.LONG, never interrupted: what the launcher-SIGKILL
    (test_reliability.py) and the write-error (test_checkpoint_faults.py) faults must end equal
    to. One launch for both."""
    run = tmp_path_factory.mktemp("two_rank_uninterrupted") / "run"
    result = launch("cpu_2proc.yaml", two_rank_args(tiny_ckpt, run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def two_rank_args(tiny_ckpt: Path, run: Path) -> list[str]:
    from test_reliability import LONG
    return tiny_args(tiny_ckpt, run, *LONG, "--method.name=pcgrad")


def launch(config: str, args: list[str], timeout: int = 600, env_extra: dict | None = None, processes: int = 0):
    """Run the trainer the way users do: accelerate launch --config_file accelerate_configs/<config>
    (``processes``: override the config's num_processes, as users do with --num_processes)."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(ROOT / "accelerate_configs" / config), "--main_process_port", str(free_port()),
           *(["--num_processes", str(processes)] if processes else []),
           str(ROOT / "mtbert" / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def rel_diff(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all parameters together. (Per tensor it would be dominated by
    attention key biases, whose true gradient is exactly 0: Adam normalises their rounding noise.)"""
    assert a.keys() == b.keys()
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5
    return (num / sum((b[k].double() ** 2).sum() for k in b) ** 0.5).item()


def worst_tensor(a: dict, b: dict) -> tuple[float, str]:
    """The largest per-tensor ||a_k - b_k|| / ||b_k||, and its name: a single tensor gone wrong (a head
    not updated, one parameter group's gradient doubled) that `rel_diff` dilutes over the whole model.
    Not elementwise: AdamW divides by sqrt(v) + eps, so an element whose gradient is near eps (a rare
    token's embedding) turns rounding differences into ~lr-sized moves, by how much depends on the CPU.
    The key third of a fused qkv bias is left out: its exact gradient is 0 (softmax is shift-invariant
    per query), so what it holds is rounding noise that Adam normalised."""
    assert a.keys() == b.keys()
    rows = []
    for k in a:
        x, y = a[k].double().clone(), b[k].double().clone()
        if k.endswith("qkv.bias"):
            h = x.numel() // 3
            x[h:2 * h] = y[h:2 * h] = 0
        rows.append((((x - y).norm() / y.norm().clamp_min(1e-12)).item(), k))
    return max(rows)


class TwoTaskModel(torch.nn.Module):
    """The smallest multitask model for unit tests: a shared body and two one-layer heads."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 1)})

    def task_parameter_names(self, task):
        return [n for n, _ in self.named_parameters() if n.startswith(f"heads.{task}.")]


def pytest_terminal_summary(terminalreporter):
    """How the launch groups went (tests/harness.py): one line per launch."""
    from harness import LAUNCHES
    if LAUNCHES:
        terminalreporter.section("launch groups")
        for launch in LAUNCHES:
            terminalreporter.write_line(f"{launch['config']} x {launch['processes']}: {launch['cases']} case(s) "
                                        f"in {launch['seconds']} s")
