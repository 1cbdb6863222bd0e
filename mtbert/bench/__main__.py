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
``zero`` (bench/dist.py: 2 gloo ranks under ZeRO-2 and ZeRO-3: PCGrad vs the summed step under the same engine,
gradient bytes per step and gradient buffers held per rank), ``fsdp2`` (the same under FSDP2,
2 gloo ranks started by torchrun); on request ``compile`` (bench/compile.py: the encoder eager vs
torch.compile on varying lengths, compile time amortised over a recipe-length run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mtbert.bench.core import REPEATS, bench_checkpoint, cpu_mhz, device_peak_tflops, print_table
from mtbert.bench.parts import bench_methods, bench_model, bench_optimizer, bench_padding


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model: seconds, for tests")
    ap.add_argument("--parts", default="model,optimizer,methods,padding,dist,zero,fsdp2")
    ap.add_argument("--data-dir", default=os.environ.get("MTBERT_DATA_DIR", ""), help="CS224N files (default: sample)")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    ap.add_argument("--methods", default="", help="methods part: a comma-separated subset (the summed step always runs)")
    ap.add_argument("--quality", nargs="+", metavar="RUN_DIR", help="time-to-quality of these runs (mtbert/report/quality.py)")
    ap.add_argument("--targets", default="", help="with --quality: TASK=VALUE,... (default: the recipe's dev targets)")
    args = ap.parse_args(argv)
    if args.quality:
        from mtbert.report.quality import report
        try:
            print(report(args.quality, args.targets))
        except ValueError as e:
            print(f"input error: {e}", file=sys.stderr)
            return 2
        return 0
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mhz_start = cpu_mhz()
    ckpt = bench_checkpoint(args.quick, Path(os.environ.get("TMPDIR", "/tmp")) / "mtbert-bench")
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
        from mtbert.bench.compile import bench_compile
        rows += bench_compile(ckpt, device, args.quick)
    if {"dist", "zero", "fsdp2"} & set(parts):
        from mtbert.bench import dist as bench_dist
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
