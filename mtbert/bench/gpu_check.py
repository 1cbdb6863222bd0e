"""A one-command acceptance check for the day a GPU is at hand (~5-10 minutes on one GPU):

    bash launch/gpu_check.sh                  # = python -m mtbert.bench.gpu_check --out runs/gpu_check

- NCCL, world 1 (torchrun): every method in bf16 and fp16 (the collectives, device-checked in
  mtbert/distributed/collectives.py, take CUDA tensors or the run stops), and ``train.compile``;
- DeepSpeed ZeRO-2 and ZeRO-3 and FSDP2, world 1, with the summed path and PCGrad (bf16, fp16);
- the bench's model part: minBERT's tokens/s and MFU against the device's bf16 peak.
One table at the end (and ``gpu_check.md``/``.json`` in ``--out``); exit 1 if any row failed.
The runs of one launch run in one process (mtbert/training/multirun.py): the packaged all-MiniLM-L6-v2 on
the packaged sample data, a few steps each. It needs no test files. ``--device cpu`` runs the
same plumbing on gloo (a dry run; the suite never needs a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_TASK = ("pcgrad", "gse", "mgda", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "nash_mtl", "gradvac")
SUMMED = ("sum", "mean", "rlw", "uw", "dwa", "famo")


def run_args(out: Path, checkpoint: str, steps: int, *extra: str) -> list[str]:
    return [f"--model.checkpoint={checkpoint}", f"--train.out_dir={out}", "--data.batch_size=16", "--train.epochs=1",
            f"--train.epoch_steps={steps}", "--train.progress=false", "--train.log_every=1", "--data.max_eval=64",
            "--train.predict_test=false", "--train.resume=false", *extra]


def plans(out: Path, checkpoint: str, steps: int, methods: list[str]) -> list[dict]:
    """The launches: (name, launcher command prefix, cases)."""
    nccl = [(f"{m}-{p}", [f"--method.name={m}", f"--train.precision={p}"]) for m in methods for p in ("bf16", "fp16")]
    nccl += [("pcgrad-layer-bf16", ["--method.name=pcgrad", "--method.gram_blocks=layer", "--train.precision=bf16"]),
             ("compile-sum-bf16", ["--method.name=sum", "--train.precision=bf16", "--train.compile=true"])]
    sharded = [(f"{m}-{p}", [f"--method.name={m}", f"--train.precision={p}"])
               for m, p in (("sum", "bf16"), ("pcgrad", "bf16"), ("pcgrad", "fp16"), ("sum", "fp16"))]
    accel = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1"]
    launches = [("nccl-world1", [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1"], nccl)]
    for name, config in (("zero2-world1", "zero2.yaml"), ("zero3-world1", "zero3.yaml"), ("fsdp2-world1", "fsdp2.yaml")):
        launches.append((name, [*accel, "--config_file", str(ROOT / "accelerate_configs" / config)], sharded))
    return [{"name": n, "cmd": cmd, "cases": [{"id": cid, "args": run_args(out / n / cid, checkpoint, steps, *a)}
                                             for cid, a in cases]} for n, cmd, cases in launches]


def run_launch(plan: dict, out: Path, timeout: float) -> list[dict]:
    """One launch of mtbert.training.multirun for the plan's cases -> one table row per case."""
    from mtbert.training.multirun import read_results
    folder = out / plan["name"]
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / "plan.json"
    plan_file.write_text(json.dumps({"results": str(folder / "results"), "cases": plan["cases"]}))
    cmd = [*plan["cmd"], "--master_port" if "torchrun" in plan["cmd"][0] else "--main_process_port",
           str(29500 + os.getpid() % 1000), "-m", "mtbert.training.multirun", str(plan_file)]
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail = (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        tail = f"timed out after {timeout:.0f} s"
    results = read_results(folder / "results", [c["id"] for c in plan["cases"]])
    rows = []
    for case in plan["cases"]:
        got = results.get(case["id"])
        run = Path(next(a for a in case["args"] if a.startswith("--train.out_dir=")).split("=", 1)[1])
        rows.append({"launch": plan["name"], "case": case["id"], **summarise(run, got),
                     "error": "" if got and got["code"] == 0 else (_error(folder / "results", case["id"]) or tail)})
    print(f"[{plan['name']}] {len(plan['cases'])} run(s) in {time.time() - start:.0f} s", flush=True)
    return rows


def summarise(run: Path, got: dict | None) -> dict:
    if not got:
        return {"ok": False, "exit": None, "wall_s": None, "examples_per_s": None, "skipped": None, "dev": None}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    train = [m for m in metrics if m["split"] == "train"]
    dev = [m for m in metrics if m["split"] == "dev"]
    rate = sorted(m["examples_per_s"] for m in train[1:])  # the first step compiles and warms up
    return {"ok": got["code"] == 0 and bool(train), "exit": got["code"], "wall_s": got["wall_s"],
            "examples_per_s": round(rate[len(rate) // 2], 1) if rate else None,
            "skipped": int(sum(m.get("skipped", 0) for m in train)), "dev": round(dev[-1]["overall"], 4) if dev else None}


def _error(results: Path, case_id: str) -> str:
    errors = sorted(results.glob(f"{case_id}.rank*.error"))
    return errors[0].read_text()[-1500:] if errors else ""


def bench_row(out: Path) -> dict:
    """The bench's model part: minBERT vs transformers' BertModel train step, tokens/s, MFU."""
    path = out / "bench.json"
    done = subprocess.run([sys.executable, "-m", "mtbert.bench", "--parts", "model", "--out", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not path.exists():
        return {"launch": "bench", "case": "model", "ok": False, "error": (done.stdout + done.stderr)[-1500:]}
    rows = [r for r in json.loads(path.read_text())["rows"] if r["part"] == "model"]
    best = max(rows, key=lambda r: r.get("tokens_per_s", 0))
    return {"launch": "bench", "case": f"model {best.get('dtype', '')} {best.get('device', '')}", "ok": True,
            "tokens_per_s": round(best["tokens_per_s"]), "mfu": round(best["mfu"], 3),
            "speedup_vs_hf": round(best.get("speedup_vs_hf", 0), 2), "error": ""}


def table(rows: list[dict]) -> str:
    lines = ["| launch | run | ok | exit | wall s | examples/s | skipped steps | dev overall | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["launch"] == "bench":
            note = (f"tokens/s {r.get('tokens_per_s')}, MFU {r.get('mfu')}, {r.get('speedup_vs_hf')}x HF"
                    if r["ok"] else r["error"].strip().splitlines()[-1][:120])
            lines.append(f"| bench | {r['case']} | {'yes' if r['ok'] else 'NO'} | | | | | | {note} |")
            continue
        note = "" if r["ok"] else (r["error"].strip().splitlines() or ["?"])[-1][:120].replace("|", "/")
        lines.append(f"| {r['launch']} | {r['case']} | {'yes' if r['ok'] else 'NO'} | {r['exit']} | {r['wall_s']} | "
                     f"{r['examples_per_s']} | {r['skipped']} | {r['dev']} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--checkpoint", default="minilm-l6", help="model.checkpoint of every run (default: packaged)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--methods", default=",".join(SUMMED + PER_TASK), help="comma-separated method names")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the plumbing (gloo)")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device: this check is for a GPU machine (--device cpu runs its plumbing on gloo)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for plan in plans(args.out.resolve(), args.checkpoint, args.steps, args.methods.split(",")):
        rows += run_launch(plan, args.out, timeout=120 + 60 * len(plan["cases"]))
    if not args.no_bench:
        rows.append(bench_row(args.out))
    text = table(rows)
    (args.out / "gpu_check.md").write_text(text + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    print(text)
    failed = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} passed; table in {args.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
