"""The flat per-task gradient path: equal to autograd's summed gradient, heads untouched by
other tasks, absent tasks' parameters left without a gradient, and PCGrad through the Stepper
equal to PCGrad applied by hand to per-task gradients."""

import torch

from mtbert.config.cli import parse_args
from mtbert.config.schema import HeadCfg
from mtbert.data.tasks import TASKS
from mtbert.model.bert import from_pretrained
from mtbert.model.heads import MultitaskModel
from mtbert.optim.gradients import GradientBuffers
from mtbert.optim.pcgrad import pcgrad


def _model_and_batches(tiny_ckpt, tasks=("sst", "quora", "sts")):
    torch.manual_seed(0)
    enc, _ = from_pretrained(str(tiny_ckpt), dropout=0.0)
    specs = {t: TASKS[t] for t in tasks}
    model = MultitaskModel(enc, specs, {t: HeadCfg(dropout=0.0) for t in tasks})
    g = torch.Generator().manual_seed(1)
    batches = {}
    for t in tasks:
        b = {"a_ids": torch.randint(1000, 2000, (4, 7), generator=g), "a_mask": torch.ones(4, 7, dtype=torch.long)}
        if specs[t].pair:
            b.update(b_ids=torch.randint(1000, 2000, (4, 5), generator=g), b_mask=torch.ones(4, 5, dtype=torch.long))
        b["labels"] = torch.tensor([0.0, 1.0, 1.0, 0.0]) if t != "sst" else torch.tensor([0.0, 4.0, 2.0, 1.0])
        batches[t] = b
    return model, batches


def test_flat_buffers_equal_autograd_and_keep_heads_apart(tiny_ckpt):
    model, batches = _model_and_batches(tiny_ckpt)
    # reference: per-task autograd gradients
    ref = {}
    for t, b in batches.items():
        model.zero_grad(set_to_none=True)
        model.heads[t].loss(model(t, b), b["labels"]).backward()
        ref[t] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    buf = GradientBuffers(model, list(batches))
    buf.start(["sst", "sts"])  # quora absent this step
    for t in ("sst", "sts"):
        buf.point_to(t)
        model.heads[t].loss(model(t, batches[t]), batches[t]["labels"]).backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for k, t in enumerate(buf.tasks):
        if t == "quora":
            continue
        for p, v in zip(buf.shared, buf.row_views[k]):
            torch.testing.assert_close(v, ref[t][names[id(p)]])
    for t in ("sst", "sts"):
        for p in buf.private[t]:
            torch.testing.assert_close(p.grad, ref[t][names[id(p)]])  # only its own task's gradient
    assert all(p.grad is None for p in buf.private["quora"])
    assert not any(n.startswith("heads.") for n in (names[id(p)] for p in buf.shared))


def test_per_task_path_pcgrad_equals_pcgrad_by_hand(tiny_ckpt):
    from accelerate import Accelerator

    from mtbert.methods.phases import Phase
    from mtbert.training.step import Stepper, seeded_generator
    cfg = parse_args([f"--model.checkpoint={tiny_ckpt}", "--method.name=pcgrad", "--train.grad_clip=0"])
    model, batches = _model_and_batches(tiny_ckpt)
    tasks = list(batches)
    # by hand: per-task gradients of the shared parameters -> pcgrad -> expected update
    shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    G = []
    for t in tasks:
        model.zero_grad(set_to_none=True)
        model.heads[t].loss(model(t, batches[t]), batches[t]["labels"]).backward()
        G.append(torch.cat([p.grad.flatten() for p in shared]))
    expected = pcgrad(torch.stack(G), seeded_generator(cfg.train.seed, 5))
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = torch.cat([p.detach().flatten().clone() for p in shared])
    stepper = Stepper(Accelerator(cpu=True), model, opt, sched, cfg, tasks)
    stats = stepper.step(5, [batches], Phase(tuple(tasks), 1, 1, "t"))
    after = torch.cat([p.detach().flatten() for p in shared])
    torch.testing.assert_close(before - after, expected, rtol=1e-5, atol=1e-7)
    assert 0.0 <= stats["conflict/conflict_frac"] <= 1.0


def _stepper(model, cfg, tasks):
    from accelerate import Accelerator

    from mtbert.training.step import Stepper
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Stepper(Accelerator(cpu=True), model, opt, sched, cfg, tasks)


def test_a_task_only_in_a_later_micro_batch_is_in_the_step(tiny_ckpt):
    """grad_accum=2 with a probabilistic schedule: sst in micro-batch 1 only, quora in 2 only.
    Both rows are zeroed, reduced and combined, and quora's head moves (issue: the step took its
    tasks from the first micro-batch, dropping quora's shared gradient)."""
    from mtbert.methods.phases import Phase
    from mtbert.training.step import MicroBatch, seeded_generator
    cfg = parse_args([f"--model.checkpoint={tiny_ckpt}", "--method.name=pcgrad", "--train.grad_clip=0"])
    model, batches = _model_and_batches(tiny_ckpt)
    shared = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    G = []
    for t in ("sst", "quora"):  # by hand: each task's gradient / 2 (the accumulation mean)
        model.zero_grad(set_to_none=True)
        (model.heads[t].loss(model(t, batches[t]), batches[t]["labels"]) / 2).backward()
        G.append(torch.cat([p.grad.flatten() for p in shared]))
    expected = pcgrad(torch.stack(G), seeded_generator(cfg.train.seed, 3))
    model.zero_grad(set_to_none=True)
    stepper = _stepper(model, cfg, list(batches))
    before = torch.cat([p.detach().flatten().clone() for p in shared])
    head = [p.detach().clone() for p in model.heads["quora"].parameters()]
    assert head
    micro = [MicroBatch({"sst": batches["sst"]}, {"sst": 1.0}), MicroBatch({"quora": batches["quora"]}, {"quora": 1.0})]
    stepper.step(3, micro, Phase(("sst", "quora", "sts"), 1, 1, "t"))
    after = torch.cat([p.detach().flatten() for p in shared])
    torch.testing.assert_close(before - after, expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(head, model.heads["quora"].parameters()))  # its head moved


def test_bf16_parameters_keep_fp32_rows_and_the_fp32_pcgrad_weights(tiny_ckpt):
    """DeepSpeed bf16 casts parameters to bf16: the rows, the Gram input and the update stay
    fp32, so the PCGrad weights equal the weights from the same gradients in fp32."""
    from mtbert.optim.pcgrad import gram_matrix, pcgrad_weights
    model, batches = _model_and_batches(tiny_ckpt)
    model = model.to(torch.bfloat16)
    tasks = list(batches)
    buf = GradientBuffers(model, tasks)
    assert buf.G.dtype == buf.update.dtype == torch.float32
    buf.start(tasks, attach=False)
    exact = []
    for t in tasks:
        params = buf.shared + buf.private[t]
        total = None
        for half in (slice(0, 2), slice(2, 4)):  # two micro-batches accumulate into the row
            b = {k: v[half] for k, v in batches[t].items()}
            loss = model.heads[t].loss(model(t, b), b["labels"]) / 2
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            buf.accumulate(t, grads)
            flat = torch.cat([g.double().flatten() for g in grads[:len(buf.shared)]])
            total = flat if total is None else total + flat
        exact.append(total)
    rows = buf.rows(tasks)
    exact = torch.stack(exact)
    torch.testing.assert_close(rows[:, :buf.P].double(), exact, rtol=0, atol=0)  # fp32 holds bf16 sums exactly
    g = torch.Generator()
    w = pcgrad_weights(gram_matrix(rows), g.manual_seed(0))
    w32 = pcgrad_weights(gram_matrix(exact.float()), g.manual_seed(0))
    torch.testing.assert_close(w, w32, rtol=1e-12, atol=0)
    w16 = pcgrad_weights(gram_matrix(exact.bfloat16()), g.manual_seed(0))  # what bf16 rows gave
    assert not torch.equal(w, w16)


def test_block_grams_of_the_shards_sum_to_the_full_block_grams():
    """The sharded reducer's partial block Grams (each rank's columns cut by the parameter blocks)
    add up to the block Grams of the full rows, for blocks that straddle shard boundaries."""
    from mtbert.optim.gradients import block_gram, block_ranges, local_blocks
    names = ["encoder.emb.word.weight", "encoder.emb.norm.bias", "encoder.layers.0.qkv.weight",
             "encoder.layers.0.qkv.bias", "encoder.layers.1.ffn.weight", "extra.weight"]
    sizes = [7, 2, 9, 3, 8, 4]
    world = 3
    P_pad = -(-sum(sizes) // world) * world
    blocks = block_ranges(names, sizes, P_pad, "layer")
    assert blocks == [(0, 9), (9, 21), (21, 29), (29, P_pad)]
    rows = torch.randn(3, P_pad, dtype=torch.float64)
    rows[:, sum(sizes):] = 0
    n = P_pad // world
    partial = sum(block_gram(rows[:, r * n:(r + 1) * n], local_blocks(blocks, r * n, n)) for r in range(world))
    torch.testing.assert_close(partial, block_gram(rows, blocks), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(partial.sum(0), rows @ rows.T, rtol=1e-12, atol=1e-12)


def test_each_tasks_reduction_starts_after_its_last_backward_and_is_waited_before_the_gram(tiny_ckpt):
    """The overlap (issue: hide the per-task communication behind backward): task t's row is
    handed to the reducer as soon as its last micro-batch's backward is done, so its collective
    runs while the next task computes; the step waits once, before the Gram."""
    from mtbert.methods.phases import Phase
    from mtbert.training.step import MicroBatch
    cfg = parse_args([f"--model.checkpoint={tiny_ckpt}", "--method.name=pcgrad", "--train.grad_clip=0"])
    model, batches = _model_and_batches(tiny_ckpt)
    stepper = _stepper(model, cfg, list(batches))
    events = []

    def record(obj, name, label):
        real = getattr(obj, name)

        def wrapped(*a, **k):
            events.append(label(*a))
            return real(*a, **k)
        setattr(obj, name, wrapped)
    record(stepper.engine, "task_backward", lambda buf, t, loss: f"backward {t}")
    record(stepper.reducer, "launch", lambda k, *a: f"launch {stepper.buffers.tasks[k]}")
    record(stepper.reducer, "wait", lambda: "wait")
    record(stepper.reducer, "reduce", lambda *a: "gram")
    # two micro-batches: sst and quora in the first, quora and sts in the second
    micro = [MicroBatch({"sst": batches["sst"], "quora": batches["quora"]}, {"sst": 1.0, "quora": 1.0}),
             MicroBatch({"quora": batches["quora"], "sts": batches["sts"]}, {"quora": 1.0, "sts": 1.0})]
    stepper.step(1, micro, Phase(("sst", "quora", "sts"), 1, 1, "t"))
    assert events == ["backward sst", "launch sst", "backward quora", "backward quora", "launch quora",
                      "backward sts", "launch sts", "wait", "gram"], events
