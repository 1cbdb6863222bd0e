"""What every bench part shares: side-by-side timing (configurations alternate after warm-up;
every ratio reports its spread), the peak FLOP/s for MFU, the checkpoint and batches the parts
run on, and the table they print (``python -m mtbert.bench``: bench/__main__.py)."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

# Dense bf16 peak of common accelerators, TFLOP/s (for MFU); CPU peak is estimated below.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0, "V100": 125.0}


def device_peak_tflops(device: torch.device, dtype) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return (peak if dtype != torch.float32 else peak / 2), name
        return float("nan"), name
    # CPU: cores x GHz x 32 fp32 FLOP/cycle (two AVX2 FMA units); a rough upper bound.
    ghz = 2.5
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
        ghz = max(mhz) / 1000 if mhz else ghz
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return cores * ghz * 32 / 1000, f"{platform.processor() or 'cpu'} x{cores} @ {ghz:.2f} GHz"


REPEATS = 5  # alternating rounds per comparison (after warm-up): every ratio reports its spread over them


class Times(dict):
    """name -> seconds of each round; in round r every configuration ran once, back to back."""

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def ratio(self, num: str, den: str, key: str) -> dict:
        """``num / den`` per round (paired: the same round, so a slow spell hits both), as the
        median with the smallest and largest round: {key, key_lo, key_hi, repeats}."""
        r = sorted(a / b for a, b in zip(self[num], self[den]))
        return {key: statistics.median(r), f"{key}_lo": r[0], f"{key}_hi": r[-1], "repeats": len(r)}


def alternate(fns: dict, repeats: int = REPEATS, warmup: int = 1) -> Times:
    """Seconds per call of each fn, calls interleaved A B A B ... after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = Times({k: [] for k in fns})
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    return times


def cpu_mhz() -> float | None:
    """The current clock (the highest core's), from /proc/cpuinfo; None where it is not readable."""
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return None
    return max(mhz) if mhz else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_checkpoint(quick: bool, tmp: Path) -> str:
    if not quick:
        return "minilm-l6"
    folder = tmp / "tiny_bert"
    if not (folder / "config.json").exists():
        import shutil

        from transformers import BertConfig, BertModel

        from mtbert.model.bert import resolve_checkpoint
        torch.manual_seed(0)
        BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                             max_position_embeddings=128)).save_pretrained(folder)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(resolve_checkpoint("minilm-l6") / name, folder / name)
    return str(folder)


def task_batches(cfg, model, tokenizer, specs, n_batches: int):
    from mtbert.data.batching import load_split
    from mtbert.data.sampler import ShardedTaskSampler
    splits = {t: load_split(specs[t], "train", cfg, tokenizer, model.heads[t].kind, lambda *a: None) for t in specs}
    sampler = ShardedTaskSampler({t: s.lengths() for t, s in splits.items()}, 0, 1, 0, cfg.data.batch_size, True)
    return [{t: splits[t].batch(i) for t, i in sampler.next({t: cfg.data.batch_size for t in specs}).items()}
            for _ in range(n_batches)]



def print_table(rows: list[dict]) -> None:
    """One line per row; a ratio reads ``median [lo-hi, n=repeats]``, and says so when its spread
    crosses 1.0 (the rounds disagree on which configuration is faster: not a result)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    for part in dict.fromkeys(r["part"] for r in rows):
        print(f"\n[{part}]")
        for r in rows:
            if r["part"] != part:
                continue
            cells = []
            for k, v in r.items():
                if k == "part" or k.endswith(("_lo", "_hi")) or k == "repeats":
                    continue
                if f"{k}_lo" in r:
                    lo, hi = r[f"{k}_lo"], r[f"{k}_hi"]
                    cross = " SPREAD CROSSES 1.0" if lo < 1 < hi else ""
                    cells.append(f"{k}={v:.3f} [{lo:.3f}-{hi:.3f}, n={r['repeats']}]{cross}")
                else:
                    cells.append(f"{k}={fmt(v)}")
            print("  " + "  ".join(cells))
