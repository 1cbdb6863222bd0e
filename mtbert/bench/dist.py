"""The distributed parts of ``python -m mtbert.bench`` (``dist``, ``zero``, ``fsdp2``): each
launches 2 gloo ranks running a worker of this module, which alternates the configurations
side by side and writes its rows as JSON (rank 0).

    python -m mtbert.bench.dist {dist,zero,fsdp2} --out FILE [--quick] [--data-dir DIR]   # as a rank
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mtbert.bench.core import alternate, bench_checkpoint, task_batches


def bench_dist(quick: bool, out: Path, data_dir: str) -> list[dict]:
    """Launch 2 gloo ranks (accelerate, cpu_2proc.yaml) running ``--dist-worker``."""
    root = Path(__file__).resolve().parents[2]
    accel = Path(sys.executable).parent / "accelerate"
    cmd = [str(accel) if accel.exists() else "accelerate", "launch", "--config_file",
           str(root / "accelerate_configs" / "cpu_2proc.yaml"), "-m", "mtbert.bench.dist", "dist",
           "--out", str(out)] + (["--quick"] if quick else []) + ([f"--data-dir={data_dir}"] if data_dir else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"dist bench failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def dist_worker(quick: bool, out: Path, data_dir: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from transformers import AutoTokenizer

    from mtbert.config.cli import parse_args
    from mtbert.config.schema import HeadCfg
    from mtbert.data.tasks import build_specs
    from mtbert.methods.phases import Phase
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.training.step import Stepper
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert accelerator.num_processes == 2, "the distributed benchmark needs 2 ranks"
    ckpt = bench_checkpoint(quick, Path(os.environ.get("TMPDIR", "/tmp")) / "mtbert-bench")
    variants = {"ddp_sum": ["--method.name=sum"], "pcgrad_allreduce": ["--method.name=pcgrad"],
                "pcgrad_sharded": ["--method.name=pcgrad", "--method.reducer=sharded"]}
    steppers, batches = {}, None
    for name, extra in variants.items():
        cfg = parse_args([f"--model.checkpoint={ckpt}", "--data.batch_size=" + ("4" if quick else "16"),
                          "--method.conflict_stats=false", *extra] + ([f"--data.dir={data_dir}"] if data_dir else []))
        torch.manual_seed(0)
        enc, folder = from_pretrained(cfg.model.checkpoint, 0.0)
        specs = build_specs(cfg)
        model = MultitaskModel(enc, specs, {t: HeadCfg(dropout=0.0) for t in specs})
        if batches is None:
            batches = task_batches(cfg, model, AutoTokenizer.from_pretrained(str(folder)), specs, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model, opt = accelerator.prepare(model, opt)
        steppers[name] = Stepper(accelerator, model, opt, sched, cfg, list(specs))
    phase = Phase(tuple(batches[0]), 1, 1, "bench")
    moved = {}
    counter = {"i": 0}

    def make(name):
        def run():
            i = counter["i"] = counter["i"] + 1
            stats = steppers[name].step(i, [batches[(i + accelerator.process_index) % len(batches)]], phase)
            moved[name] = stats.get("comm_bytes")
        return run
    t = alternate({n: make(n) for n in variants})
    P = sum(p.numel() for p in steppers["ddp_sum"].params)
    moved["ddp_sum"] = 2 * P * 4 * (accelerator.num_processes - 1) // accelerator.num_processes  # DDP: one all-reduce of [P]
    rows = [{"part": "dist", "config": n, "step_s": t.median(n), **t.ratio(n, "ddp_sum", "vs_ddp_sum"),
             "bytes_per_step_per_rank": moved[n]} for n in t]
    if accelerator.is_main_process:
        out.write_text(json.dumps(rows))
    accelerator.wait_for_everyone()


def bench_zero(quick: bool, out: Path, data_dir: str) -> list[dict]:
    """2 gloo ranks under DeepSpeed ZeRO-2 and ZeRO-3 (one launch per stage: the stage is a launch
    setting): PCGrad vs the summed loss under the same engine, side by side in each launch."""
    root = Path(__file__).resolve().parents[2]
    accel = Path(sys.executable).parent / "accelerate"
    rows = []
    for stage in (2, 3):
        part = out.with_suffix(f".zero{stage}.json")
        cmd = [str(accel) if accel.exists() else "accelerate", "launch", "--config_file",
               str(root / "accelerate_configs" / f"zero{stage}.yaml"), "--num_processes", "2",
               "-m", "mtbert.bench.dist", "zero", "--out", str(part)] + (["--quick"] if quick else []) + (
               [f"--data-dir={data_dir}"] if data_dir else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=1800)
        if res.returncode != 0:
            raise RuntimeError(f"zero{stage} bench failed:\n{res.stderr[-3000:]}")
        rows += json.loads(part.read_text())
    return rows


def zero_worker(quick: bool, out: Path, data_dir: str) -> None:
    """One DeepSpeed engine (a second one in the same process breaks ZeRO-2's buckets), stepped
    alternately by a summed-loss Stepper and a PCGrad Stepper."""
    from transformers import AutoTokenizer

    from mtbert.config.cli import parse_args
    from mtbert.config.schema import HeadCfg
    from mtbert.data.tasks import build_specs
    from mtbert.distributed.accelerator import configure_deepspeed, make_accelerator, zero_stage
    from mtbert.methods.phases import Phase
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.training.step import Stepper
    ckpt = bench_checkpoint(quick, Path(os.environ.get("TMPDIR", "/tmp")) / "mtbert-bench")
    cfgs = {name: parse_args([f"--model.checkpoint={ckpt}", "--data.batch_size=" + ("4" if quick else "16"),
                              "--method.conflict_stats=false", f"--method.name={name}", "--train.grad_clip=1.0"]
                             + ([f"--data.dir={data_dir}"] if data_dir else [])) for name in ("sum", "pcgrad")}
    accelerator = make_accelerator(cfgs["pcgrad"])[0]
    assert accelerator.num_processes == 2, "the ZeRO benchmark needs 2 ranks"
    torch.manual_seed(0)
    enc, folder = from_pretrained(cfgs["sum"].model.checkpoint, 0.0)
    specs = build_specs(cfgs["sum"])
    model = MultitaskModel(enc, specs, {t: HeadCfg(dropout=0.0) for t in specs})
    batches = task_batches(cfgs["sum"], model, AutoTokenizer.from_pretrained(str(folder)), specs, 4)
    P = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    configure_deepspeed(accelerator, cfgs["sum"])
    model, opt = accelerator.prepare(model, opt)
    steppers = {n: Stepper(accelerator, model, opt, sched, c, list(specs)) for n, c in cfgs.items()}
    stage, world, K = zero_stage(accelerator), accelerator.num_processes, len(batches[0])
    phase = Phase(tuple(batches[0]), 1, 1, "bench")
    moved, counter = {}, {"i": 0}

    def make(name):
        def run():
            i = counter["i"] = counter["i"] + 1
            batch = {t: {k: v.to(accelerator.device) for k, v in b.items()}
                     for t, b in batches[(i + accelerator.process_index) % len(batches)].items()}
            moved[name] = steppers[name].step(i, [batch], phase).get("comm_bytes")
        return run
    t = alternate({n: make(n) for n in steppers})
    ring = lambda n, passes: passes * n * 4 * (world - 1) // world  # noqa: E731  bytes one rank sends
    # Gradient traffic per rank and step (ring model; parameter gathers left out: the same for both).
    # sum: one reduce-scatter of P. pcgrad: ZeRO-3 counts its K reduce-scatters + the Gram itself; under
    # ZeRO-2 mtbert's reducer moves the rows, then the surrogate backward reduce-scatters P once more.
    moved["sum"] = ring(P, 1)
    if stage != 3:
        moved["pcgrad"] = (moved["pcgrad"] or 0) + ring(P, 1)
    buf = steppers["pcgrad"].buffers
    held = {"sum": P * 4 // world if stage == 3 else P * 4,  # the engine's gradient (ZeRO-2: full .grad)
            "pcgrad": (buf.G.numel() + buf.update.numel()) * 4 + P * 4 // world}
    rows = [{"part": "zero", "config": f"zero{stage}_{n}", "step_s": t.median(n),
             **t.ratio(n, "sum", "vs_sum_same_engine"), "grad_bytes_per_step_per_rank": moved[n],
             "grad_buffer_bytes_per_rank": held[n], "K": K, "P": P, "ranks": world} for n in t]
    if accelerator.is_main_process:
        out.write_text(json.dumps(rows))
    accelerator.wait_for_everyone()


def bench_fsdp2(quick: bool, out: Path, data_dir: str) -> list[dict]:
    """2 gloo ranks (torchrun: Accelerate has no FSDP on CPU), the model fully_shard'ed per layer."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun) if torchrun.exists() else "torchrun", "--nproc_per_node", "2", "-m", "mtbert.bench.dist",
           "fsdp2", "--out", str(out)] + (["--quick"] if quick else []) + (
           [f"--data-dir={data_dir}"] if data_dir else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"fsdp2 bench failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def fsdp2_worker(quick: bool, out: Path, data_dir: str) -> None:
    """A summed-loss Stepper and a PCGrad Stepper stepping one fully_shard'ed model alternately."""
    from transformers import AutoTokenizer

    from mtbert.config.cli import parse_args
    from mtbert.config.schema import HeadCfg
    from mtbert.data.tasks import build_specs
    from mtbert.distributed.collectives import Collectives
    from mtbert.distributed.engines.fsdp2 import plain_accelerator, shard_model
    from mtbert.methods.phases import Phase
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.training.step import Stepper
    coll = Collectives.from_env("cpu")
    world, rank = coll.world, coll.rank
    ckpt = bench_checkpoint(quick, Path(os.environ.get("TMPDIR", "/tmp")) / "mtbert-bench")
    cfgs = {name: parse_args([f"--model.checkpoint={ckpt}", "--data.batch_size=" + ("4" if quick else "16"),
                              "--method.conflict_stats=false", f"--method.name={name}", "--train.grad_clip=1.0"]
                             + ([f"--data.dir={data_dir}"] if data_dir else [])) for name in ("sum", "pcgrad")}
    torch.manual_seed(0)
    enc, folder = from_pretrained(cfgs["sum"].model.checkpoint, 0.0)
    specs = build_specs(cfgs["sum"])
    model = MultitaskModel(enc, specs, {t: HeadCfg(dropout=0.0) for t in specs})
    batches = task_batches(cfgs["sum"], model, AutoTokenizer.from_pretrained(str(folder)), specs, 4)
    P, K = sum(p.numel() for p in model.parameters()), len(batches[0])
    model = shard_model(model, coll.device_mesh())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = plain_accelerator(world, rank)
    steppers = {n: Stepper(acc, model, opt, sched, c, list(specs), coll) for n, c in cfgs.items()}
    phase = Phase(tuple(batches[0]), 1, 1, "bench")
    moved, counter = {}, {"i": 0}

    def make(name):
        def run():
            i = counter["i"] = counter["i"] + 1
            moved[name] = steppers[name].step(i, [batches[(i + rank) % len(batches)]], phase).get("comm_bytes")
        return run
    t = alternate({n: make(n) for n in steppers})
    moved["sum"] = P * 4 * (world - 1) // world  # one reduce-scatter of P (ring model)
    buf = steppers["pcgrad"].buffers
    held = {"sum": P * 4 // world, "pcgrad": (buf.G.numel() + buf.update.numel()) * 4 + P * 4 // world}
    rows = [{"part": "fsdp2", "config": f"fsdp2_{n}", "step_s": t.median(n),
             **t.ratio(n, "sum", "vs_sum_same_engine"), "grad_bytes_per_step_per_rank": moved[n],
             "grad_buffer_bytes_per_rank": held[n], "K": K, "P": P, "ranks": world} for n in t]
    if rank == 0:
        out.write_text(json.dumps(rows))
    coll.close()


WORKERS = {"dist": lambda a: dist_worker(a.quick, a.out, a.data_dir),
           "zero": lambda a: zero_worker(a.quick, a.out, a.data_dir),
           "fsdp2": lambda a: fsdp2_worker(a.quick, a.out, a.data_dir)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("worker", choices=sorted(WORKERS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-dir", default="")
    args = ap.parse_args(argv)
    WORKERS[args.worker](args)
    return 0


if __name__ == "__main__":  # a launched worker: it leaves like every launched process (process.leave)
    from mtbert.distributed.collectives import destroy_process_group
    from mtbert.training import process
    code = main()
    destroy_process_group()
    process.leave(code)
