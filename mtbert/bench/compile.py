"""The ``compile`` part of ``python -m mtbert.bench``: the encoder's train step (forward,
backward, AdamW) eager vs ``torch.compile``, on length-bucketed batches of varying lengths (as
the trainer makes them), compile time included and amortised over a recipe-length run.

Dynamic shapes (``dynamic=True``): one graph serves every sequence length, so a run compiles a
few graphs (counted: ``graphs``) instead of one per bucket length. ``end_to_end`` is the eager
time of ``steps`` training steps over the compiled one's, compile time included.
"""

from __future__ import annotations

import time

import torch

from mtbert.bench.core import alternate

LENGTHS = (24, 40, 16, 64, 32)  # bucketed batches: the sequence length changes from batch to batch
RECIPE_STEPS = 3 * 820  # the recipe: 820 steps of one batch per task (README)


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"].get("unique_graphs", 0))


def bench_compile(ckpt: str, device, quick: bool) -> list[dict]:
    from mtbert.model.bert import from_pretrained
    rows = []
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        B = 8 if quick or dtype == torch.bfloat16 else 32  # bf16 has no native support on these CPUs: ~17x slower
        models, opts = {}, {}
        for name in ("eager", "compiled"):
            torch.manual_seed(0)
            m, _ = from_pretrained(ckpt, dropout=0.0)
            m.pooler = None
            m.to(device).train()
            models[name] = torch.compile(m, dynamic=True) if name == "compiled" else m
            opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randint(1000, 30000, (B, T), generator=g).to(device),
                    torch.ones(B, T, dtype=torch.long, device=device)) for T in LENGTHS]
        ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else \
            (lambda: torch.autocast(device.type, enabled=False))
        calls = {"eager": 0, "compiled": 0}

        def make(name):
            def step():
                ids, mask = batches[calls[name] % len(batches)]
                calls[name] += 1
                with ctx():
                    loss = models[name](ids, mask).float().pow(2).mean()
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
            return step
        steps = {n: make(n) for n in models}
        before = _graphs()
        t0 = time.perf_counter()
        for _ in LENGTHS:  # the first pass over every length: compiles (and recompiles) happen here
            steps["compiled"]()
        compile_s = time.perf_counter() - t0
        graphs = _graphs() - before
        t = alternate(steps, 2 * len(LENGTHS), warmup=len(LENGTHS))  # every length twice
        eager, comp = t.median("eager"), t.median("compiled")
        first_pass = compile_s - comp * len(LENGTHS)  # compile time beyond the steps themselves
        rows.append({"part": "compile", "dtype": str(dtype).split(".")[1], "batch": f"{B}x{list(LENGTHS)}",
                     "eager_s": eager, "compiled_s": comp, **t.ratio("eager", "compiled", "speedup"),
                     "compile_s": first_pass, "graphs": graphs,
                     "end_to_end": eager * RECIPE_STEPS / (first_pass + comp * RECIPE_STEPS),
                     "recipe_steps": RECIPE_STEPS})
    return rows
