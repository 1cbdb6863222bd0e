"""The bench's single-process parts: ``model`` (minBERT vs transformers.BertModel, tokens/s and
MFU), ``optimizer`` (AdamW implementations), ``methods`` (each method's step vs the summed step)
and ``padding`` (length-bucketed vs random batches)."""

from __future__ import annotations

import time

import torch

from mtbert.bench.core import REPEATS, alternate, device_peak_tflops, peak_rss_mb, task_batches


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

    from mtbert.config.cli import parse_args
    from mtbert.config.schema import HeadCfg
    from mtbert.data.tasks import build_specs
    from mtbert.methods.phases import Phase
    from mtbert.model.bert import from_pretrained
    from mtbert.model.heads import MultitaskModel
    from mtbert.optim.loss_weighting import has_learnable_weights
    from mtbert.training.step import Stepper
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
            batches = task_batches(cfg, model, AutoTokenizer.from_pretrained(str(folder)), specs, 4)
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

    from mtbert.config.cli import parse_args
    from mtbert.config.schema import HeadCfg
    from mtbert.data.batching import load_split
    from mtbert.data.sampler import TaskStream
    from mtbert.data.tasks import build_specs
    from mtbert.model.bert import from_pretrained, resolve_checkpoint
    from mtbert.model.heads import MultitaskModel
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
