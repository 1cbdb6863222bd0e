"""Step-level FSDP2 equivalence, run by tests/test_fsdp2.py under torchrun (gloo, CPU mesh):
N ranks whose model is ``fully_shard``ed (engines/fsdp2.py) take Stepper steps on their slices
of the global batch; every rank also runs the 1-process reference (TorchEngine) on the whole
global batch. Rank 0 writes both runs' per-step gradient norms and the parameter differences.

    torchrun --nproc_per_node 2 tests/helpers/fsdp2_steps.py PLAN.json

PLAN.json: ``{"ckpt": CKPT, "steps": S, "cases": [{"out": OUT.json, "accum": A, "overrides": [...]}, ...]}``:
the cases run in turn in this one process group (fresh models, optimizers and engines each);
rank 0 writes each case's OUT.json. The launch ends through ``mtbert.training.process.leave``.

Accelerate is not used: it drops FSDP on CPU (accelerator.py refuses that launch), so the
accelerator is engines/fsdp2.plain_accelerator.
"""

import json
import sys

import torch

from mtbert.config.cli import parse_args
from mtbert.config.schema import HeadCfg
from mtbert.data.tasks import build_specs
from mtbert.distributed.collectives import Collectives
from mtbert.distributed.engines.fsdp2 import plain_accelerator, shard_model
from mtbert.methods.phases import Phase
from mtbert.model.bert import from_pretrained
from mtbert.model.heads import MultitaskModel
from mtbert.training import process
from mtbert.training.step import MicroBatch, Stepper

GLOBAL_BATCH = 12


def build(cfg):
    torch.manual_seed(0)
    enc, folder = from_pretrained(cfg.model.checkpoint, 0.0)
    specs = build_specs(cfg)
    return MultitaskModel(enc, specs, {t: HeadCfg(dropout=0.0, kind=cfg.heads[t].kind) if t in cfg.heads
                                       else HeadCfg(dropout=0.0) for t in specs}), specs, folder


def stepper(acc, model, cfg, specs, coll):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Stepper(acc, model, opt, sched, cfg, list(specs), coll)


def run_case(coll: Collectives, out: str, ckpt: str, steps: int, accum: int, overrides: list[str]) -> None:
    world, rank = coll.world, coll.rank
    cfg = parse_args([f"--model.checkpoint={ckpt}", f"--data.batch_size={GLOBAL_BATCH}", "--train.lr=1e-3",
                      "--train.grad_clip=1.0", "--method.conflict_stats=false", "--heads.sts.kind=bi", *overrides])
    from transformers import AutoTokenizer

    from mtbert.bench.core import task_batches
    ref_model, specs, folder = build(cfg)
    batches = task_batches(cfg, ref_model, AutoTokenizer.from_pretrained(str(folder)), specs, steps * accum)
    b = GLOBAL_BATCH // world
    mine = [{t: {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()} for t, batch in bb.items()} for bb in batches]
    phase = Phase(tuple(specs), steps, 1, "test")

    ref = stepper(plain_accelerator(1, 0, "NO"), ref_model, cfg, specs, Collectives(1, "cpu"))
    model = shard_model(build(cfg)[0], coll.device_mesh())
    sharded = stepper(plain_accelerator(world, rank, "FSDP"), model, cfg, specs, coll)
    norms = {"ref": [], "fsdp2": []}
    for s in range(steps):
        micro = range(s * accum, (s + 1) * accum)
        norms["ref"].append(float(ref.step(s, [MicroBatch(batches[i], dict.fromkeys(specs, 1.0)) for i in micro],
                                           phase)["grad_norm"]))
        norms["fsdp2"].append(float(sharded.step(s, [MicroBatch(mine[i], dict.fromkeys(specs, 1.0)) for i in micro],
                                                 phase)["grad_norm"]))
    got = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    want = {n: p.detach() for n, p in ref_model.named_parameters()}
    everyone = coll.gather_objects(sharded.buffers.G.shape[1] if sharded.per_task else 0)
    if rank == 0:
        shared = sum(p.numel() for p in ref.buffers.shared) if ref.per_task else 0
        num = sum(((got[n].double() - want[n].double()) ** 2).sum() for n in want) ** 0.5
        den = sum((want[n].double() ** 2).sum() for n in want) ** 0.5
        worst = max(((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item() for n in want)
        json.dump({"norms": norms, "param_rel_diff": float(num / den), "worst_tensor": worst, "world": world,
                   "shared_params": shared, "local_columns": everyone}, open(out, "w"))
    coll.barrier()


def main(plan_file: str) -> int:
    plan = json.load(open(plan_file))
    coll = Collectives.from_env("cpu")
    for case in plan["cases"]:
        run_case(coll, case["out"], plan["ckpt"], plan["steps"], case["accum"], case["overrides"])
    coll.close()
    return 0


if __name__ == "__main__":
    process.leave(main(sys.argv[1]))
