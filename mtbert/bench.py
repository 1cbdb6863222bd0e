"""Benchmarks: prints a table and writes JSON. Every comparison is a ratio measured side by
side in this process run: configurations alternate, after warm-up, median of repeats.

    python -m mtbert.bench                    # ~ a few minutes on 2 CPU cores, MiniLM-L6 size
    python -m mtbert.bench --quick            # tiny model, seconds (what the tests run)
    python -m mtbert.bench --parts model,methods,padding,dist --out bench.json
    python -m mtbert.bench --quality runs/a runs/b --targets sst=0.48,quora=0.86,sts=0.875  # time-to-quality

Parts: ``model`` (minBERT vs transformers.BertModel train step, fp32 and bf16 autocast; tokens/s
and MFU), ``optimizer`` (AdamW for-loop vs foreach vs fused), ``methods`` (each method's step vs the summed-loss step on the same batches),
``padding`` (padded-token waste and examples/s, length-bucketed vs random batches), ``dist``
(2 gloo ranks: distributed PCGrad vs DDP summed step, bytes per step; launched as a subprocess),
``zero`` (bench_dist.py: 2 gloo ranks under ZeRO-2 and ZeRO-3: PCGrad vs the summed step under the same engine,
gradient bytes per step and gradient buffers held per rank), ``fsdp2`` (the same under FSDP2,
2 gloo ranks started by torchrun); on request ``compile`` (bench_compile.py: the encoder eager vs
torch.compile on varying lengths, compile time amortised over a recipe-length run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
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


def _checkpoint(quick: bool, tmp: Path) -> str:
    if not quick:
        return "minilm-l6"
    folder = tmp / "tiny_bert"
    if not (folder / "config.json").exists():
        from transformers import BertConfig, BertModel
        import shutil
        from mtbert.model.bert import resolve_checkpoint
        torch.manual_seed(0)
        BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                             max_position_embeddings=128)).save_pretrained(folder)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(resolve_checkpoint("minilm-l6") / name, folder / name)
    return str(folder)


def bench_model(ckpt: str, device, quick: bool) -> list[dict]:
    """minBERT vs HF BertModel (same weights): forward + backward + AdamW step."""
    from transformers import BertModel
    from mtbert.model.bert import bert_flops_per_token, from_pretrained, resolve_checkpoint
    folder = resolve_checkpoint(ckpt)
    rows = []
    for dtype, (B, T, reps) in ((torch.float32, (32, 64, REPEATS)), (torch.bfloat16, (8, 32, REPEATS))):
        if quick:
            B, T = 8, 32
        ours, _ = from_pretrained(str(folder), dropout=0.0)
        hf = BertModel.from_pretrained(str(folder), add_pooling_layer=False, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)
        ours.pooler = None
        ours.to(device).train()
        hf.to(device).train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 30000, (B, T), generator=g).to(device)
        mask = torch.ones(B, T, dtype=torch.long, device=device)
        mask[B // 2:, T * 3 // 4:] = 0  # some padding, as in real batches
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, foreach=True)
        opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, foreach=True)
        ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else (lambda: torch.autocast(device.type, enabled=False))

        def step_ours():
            with ctx():
                loss = ours(ids, mask).float().pow(2).mean()
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

        def step_hf():
            with ctx():
                loss = hf(input_ids=ids, attention_mask=mask).last_hidden_state.float().pow(2).mean()
            loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)
        times = alternate({"minbert": step_ours, "hf": step_hf}, reps)
        t = {k: times.median(k) for k in times}
        tokens = B * T
        flops = bert_flops_per_token(ours.config, T) * tokens
        peak, dev_name = device_peak_tflops(device, dtype)
        rows.append({"part": "model", "dtype": str(dtype).split(".")[1], "batch": f"{B}x{T}",
                     "minbert_s": t["minbert"], "hf_s": t["hf"], **times.ratio("hf", "minbert", "speedup_vs_hf"),
                     "tokens_per_s": tokens / t["minbert"],
                     "mfu": flops / t["minbert"] / (peak * 1e12), "device": dev_name, "peak_tflops": peak,
                     "peak_rss_mb": peak_rss_mb()})
    return rows


def bench_optimizer(ckpt: str, device) -> list[dict]:
    """AdamW step on the encoder's parameters: for-loop vs foreach vs fused kernels."""
    from mtbert.model.bert import from_pretrained
    rows = []
    model, _ = from_pretrained(ckpt)
    model.to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"for_loop": torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False),
            "foreach": torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)}
    try:
        opts["fused"] = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        opts["fused"].step()
    except (RuntimeError, ValueError):
        opts.pop("fused")
    times = alternate({k: o.step for k, o in opts.items()}, 7)
    for k in times:
        rows.append({"part": "optimizer", "adamw": k, "step_ms": times.median(k) * 1e3,
                     **times.ratio("for_loop", k, "vs_for_loop")})
    return rows


def _task_batches(cfg, model, tokenizer, specs, n_batches: int):
    from mtbert.data.batching import load_split
    from mtbert.data.sampler import ShardedTaskSampler
    splits = {t: load_split(specs[t], "train", cfg, tokenizer, model.heads[t].kind, lambda *a: None) for t in specs}
    sampler = ShardedTaskSampler({t: s.lengths() for t, s in splits.items()}, 0, 1, 0, cfg.data.batch_size, True)
    return [{t: splits[t].batch(i) for t, i in sampler.next({t: cfg.data.batch_size for t in specs}).items()}
            for _ in range(n_batches)]


FAMILY = ("mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "nash_mtl", "gradvac",
          "rlw", "uw", "dwa", "famo")


def weights_ms(name: str, K: int = 3, repeats: int = 200) -> float:
    """Milliseconds per call of a Gram method's weights (host, float64) on a K x K Gram with conflicts."""
    from mtbert.optim.aggregators import AGGREGATORS, update_weights
    if name.split("_layer")[0] not in AGGREGATORS:
        return 0.0
    g = torch.randn(K, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g[1] = -0.7 * g[0] + 0.5 * g[1]
    gram = g @ g.T
    name = name.split("_layer")[0]
    t0 = time.perf_counter()
    for i in range(repeats):
        update_weights(name, gram, torch.Generator().manual_seed(i))
    return (time.perf_counter() - t0) / repeats * 1e3


def bench_methods(ckpt: str, data_dir: str, quick: bool, only: tuple = ()) -> list[dict]:
    """Each method's full step (per-task grads + aggregation + AdamW) vs the summed-loss step,
    and the Gram methods' weight computation alone (``weights_ms``, K = 3)."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer
    from mtbert.config import HeadCfg, parse_args
    from mtbert.data.tasks import build_specs
    from mtbert.methods.phases import Phase
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.optim.loss_weighting import has_learnable_weights
    from mtbert.step import Stepper
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    variants = {"sum": [], "pcgrad": ["--method.name=pcgrad"], "pcgrad_no_stats": ["--method.name=pcgrad",
                "--method.conflict_stats=false"], "gse": ["--method.name=gse"], "smart": ["--method.smart=true"],
                "rr_pcgrad_smart": ["--method.name=pcgrad", "--method.smart=true"],
                "pcgrad_layer": ["--method.name=pcgrad", "--method.gram_blocks=layer"],
                **{m: [f"--method.name={m}"] for m in FAMILY}}
    if only:
        variants = {n: a for n, a in variants.items() if n == "sum" or n in only}
    base = [f"--model.checkpoint={ckpt}", "--data.batch_size=" + ("8" if quick else "32"), "--model.dropout=0"]
    if data_dir:
        base.append(f"--data.dir={data_dir}")
    steppers, batches = {}, None
    for name, extra in variants.items():
        cfg = parse_args(base + extra)
        torch.manual_seed(0)
        enc, folder = from_pretrained(cfg.model.checkpoint, 0.0)
        specs = build_specs(cfg)
        model = MultitaskModel(enc, specs, {t: HeadCfg(dropout=0.0) for t in specs},
                               loss_log_vars=has_learnable_weights(cfg.method.name)).to(accelerator.device)
        if batches is None:
            batches = _task_batches(cfg, model, AutoTokenizer.from_pretrained(str(folder)), specs, 4)
            batches = [{t: {k: v.to(accelerator.device) for k, v in b.items()} for t, b in bb.items()} for bb in batches]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        steppers[name] = Stepper(accelerator, model, opt, sched, cfg, list(specs))
    phase = Phase(tuple(batches[0]), 1, 1, "bench")
    calls = dict.fromkeys(variants, 0)  # per method: its r-th call gets batch r, like every other method's

    def make(name):
        def run():
            i = calls[name] = calls[name] + 1
            steppers[name].step(i, [batches[i % len(batches)]], phase)
        return run
    t = alternate({n: make(n) for n in variants})
    return [{"part": "methods", "method": n, "step_s": t.median(n), **t.ratio(n, "sum", "vs_sum"),
             "weights_ms": weights_ms(n)} for n in t]


def bench_padding(ckpt: str, data_dir: str, quick: bool) -> list[dict]:
    """Padded-token fraction over one epoch of each task, and training examples/s on SST-like
    batches, length-bucketed vs random batches."""
    from transformers import AutoTokenizer
    from mtbert.config import HeadCfg, parse_args
    from mtbert.data.batching import load_split
    from mtbert.data.sampler import TaskStream
    from mtbert.data.tasks import build_specs
    from mtbert.model.bert import resolve_checkpoint
    from mtbert.model.heads import MultitaskModel
    from mtbert.model.bert import from_pretrained
    cfg = parse_args([f"--model.checkpoint={ckpt}"] + ([f"--data.dir={data_dir}"] if data_dir else []))
    tok = AutoTokenizer.from_pretrained(str(resolve_checkpoint(ckpt)))
    specs = build_specs(cfg)
    rows, splits = [], {}
    for t, spec in specs.items():
        splits[t] = split = load_split(spec, "train", cfg, tok, spec.default_head, lambda *a: None)
        lengths = split.lengths()
        for bucket in (True, False):
            s = TaskStream(0, lengths, 0, 1, 0, 32, bucket)
            real = padded = 0
            for _ in range(s.batches_per_epoch()):
                b = [lengths[i] for i in s.take(32)]
                real, padded = real + sum(b), padded + max(b) * len(b)
            rows.append({"part": "padding", "task": t, "bucket": bucket, "padded_frac": 1 - real / padded})
    # examples/s of a training step on the first task, bucketed vs random batches
    task = next(iter(specs))
    enc, _ = from_pretrained(ckpt, 0.0)
    model = MultitaskModel(enc, {task: specs[task]}, {task: HeadCfg(dropout=0.0)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    streams = {b: TaskStream(0, splits[task].lengths(), 1, 1, 0, 8 if quick else 32, b) for b in (True, False)}
    batch_size = streams[True].batch

    def make(bucket):
        def run():
            batch = splits[task].batch(streams[bucket].take(batch_size))
            model.heads[task].loss(model(task, batch), batch["labels"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    t = alternate({"bucketed": make(True), "random": make(False)}, REPEATS if quick else 12)
    rows.append({"part": "padding", "task": f"{task} train ex/s", "bucket": "bucketed vs random",
                 "padded_frac": float("nan"), "ex_per_s_bucketed": batch_size / t.median("bucketed"),
                 "ex_per_s_random": batch_size / t.median("random"), **t.ratio("random", "bucketed", "speedup")})
    return rows


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model: seconds, for tests")
    ap.add_argument("--parts", default="model,optimizer,methods,padding,dist,zero,fsdp2")
    ap.add_argument("--data-dir", default=os.environ.get("MTBERT_DATA_DIR", ""), help="CS224N files (default: sample)")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--methods", default="", help="methods part: a comma-separated subset (the summed step always runs)")
    ap.add_argument("--quality", nargs="+", metavar="RUN_DIR", help="time-to-quality of these runs (mtbert/quality.py)")
    ap.add_argument("--targets", default="", help="with --quality: TASK=VALUE,... (default: the recipe's dev targets)")
    args = ap.parse_args(argv)
    if args.quality:
        from mtbert.quality import report
        try:
            print(report(args.quality, args.targets))
        except ValueError as e:
            print(f"input error: {e}", file=sys.stderr)
            return 2
        return 0
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mhz_start = cpu_mhz()
    ckpt = _checkpoint(args.quick, Path(os.environ.get("TMPDIR", "/tmp")) / "mtbert-bench")
    parts = args.parts.split(",")
    rows: list[dict] = []
    if "model" in parts:
        rows += bench_model(ckpt, device, args.quick)
    if "optimizer" in parts:
        rows += bench_optimizer(ckpt, device)
    if "methods" in parts:
        rows += bench_methods(ckpt, args.data_dir, args.quick, tuple(filter(None, args.methods.split(","))))
    if "padding" in parts:
        rows += bench_padding(ckpt, args.data_dir, args.quick)
    if "compile" in parts:  # not in the default parts: minutes of compilation on a CPU
        from mtbert.bench_compile import bench_compile
        rows += bench_compile(ckpt, device, args.quick)
    if {"dist", "zero", "fsdp2"} & set(parts):
        from mtbert import bench_dist
        if "dist" in parts:
            rows += bench_dist.bench_dist(args.quick, args.out.with_suffix(".dist.json"), args.data_dir)
        if "zero" in parts:
            rows += bench_dist.bench_zero(args.quick, args.out, args.data_dir)
        if "fsdp2" in parts:
            rows += bench_dist.bench_fsdp2(args.quick, args.out.with_suffix(".fsdp2.json"), args.data_dir)
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device": str(device),
            "processor": device_peak_tflops(device, torch.float32)[1], "cpu_mhz_start": mhz_start,
            "cpu_mhz_end": cpu_mhz(), "threads": torch.get_num_threads(), "machine": platform.machine(),
            "data": args.data_dir or "packaged sample (mtbert/data/sample)", "repeats": REPEATS, "quick": args.quick}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print_table(rows)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
