"""ZeRO-3 per-task partitions (engines/zero3.py) with a fake stage-3 optimizer: which flat-buffer
positions become which row columns, that the ranks' partial Grams add up to the full Gram, and
what is handed back. The real engine is proved in tests/test_equivalence.py (zero3 cases)."""

import math

import pytest
import torch
from conftest import TwoTaskModel

from mtbert.distributed.engines.zero3 import PartitionRows
from mtbert.optim.gradients import GramOnlyReducer, block_gram

WORLD = 2


class LayeredModel(TwoTaskModel):
    """Two shared layers (two parameter blocks under gram_blocks=layer) and two heads."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 4))


class FakeStage3:
    """The parts of DeepSpeedZeroOptimizer_Stage3 that PartitionRows reads: fp16_groups (here in
    another order than the module's parameters, as ZeRO's parameter groups are), one flat buffer
    of this rank's partitions in that order, and the per-parameter accessor behind
    deepspeed.utils.safe_get_local_grad."""

    def __init__(self, model, rank, shift=0):
        p = dict(model.named_parameters())
        self.fp16_groups = [[p["heads.b.weight"], p["body.1.bias"], p["body.0.bias"]],
                            [p["body.1.weight"], p["heads.a.weight"], p["body.0.weight"], p["heads.a.bias"],
                             p["heads.b.bias"]]]
        self.rank, self.views, offset = rank, {}, 0
        params = [q for g in self.fp16_groups for q in g]
        total = sum(math.ceil(q.numel() / WORLD) for q in params)
        self.grad_partitions_flat_buffer = torch.zeros(total + shift)
        for i, q in enumerate(params):
            n = math.ceil(q.numel() / WORLD)
            q.ds_id, q.partition_numel, q._z3_optimizer = i, (lambda n=n: n), self
            self.views[i] = self.grad_partitions_flat_buffer.narrow(0, offset + shift, n)
            offset += n
        if shift:
            self.grad_partitions_flat_buffer = self.grad_partitions_flat_buffer[:total]

    def get_local_fp32_grad_for_param(self, param):
        return self.views[param.ds_id]

    def write(self, grads: dict) -> None:
        """What ZeRO-3's reduce-scatter leaves this rank: its (zero-padded) chunk of each gradient."""
        for q in (q for g in self.fp16_groups for q in g):
            if q in grads:
                n = q.partition_numel()
                full = torch.cat([grads[q].flatten(), torch.zeros(n * WORLD - q.numel())])
                self.views[q.ds_id].copy_(full[self.rank * n:(self.rank + 1) * n])


def _grads(model, task, seed):
    g = torch.Generator().manual_seed(seed)
    own = [p for n, p in model.named_parameters() if n.startswith(("body.", f"heads.{task}."))]
    return {p: torch.randn(p.shape, generator=g) for p in own}


@pytest.fixture
def setup():
    model = LayeredModel()
    fakes, bufs = [], []
    for r in range(WORLD):  # both ranks' views of the same parameters (each checked when built)
        fakes.append(FakeStage3(model, r))
        bufs.append(PartitionRows(fakes[-1], model, ["a", "b"], "layer"))  # "layer": body's two blocks
    return model, fakes, bufs


def test_rows_hold_this_ranks_partitions_of_the_shared_parameters_in_module_order(setup):
    model, fakes, bufs = setup
    grads = _grads(model, "a", 0)
    body = list(model.body.parameters())
    for rank, (fake, buf) in enumerate(zip(fakes, bufs)):
        buf.start(["a", "b"])
        fake.write(grads)
        buf.capture("a")
        want = torch.cat([torch.cat([grads[p].flatten(), torch.zeros(p.partition_numel() * WORLD - p.numel())])
                          .view(WORLD, -1)[rank] for p in body])
        assert buf.G.shape == (2, want.numel())  # [K, P/N]: no full gradient on this rank
        assert torch.equal(buf.G[0], want) and not buf.G[1].any()
        assert buf.priv_flat["a"].abs().sum() > 0 and not buf.priv_flat["b"].any()
        assert not fake.grad_partitions_flat_buffer.any(), "the buffer is zeroed for the next task"


def test_partial_grams_add_up_to_the_full_gram_and_the_update_is_partitioned(setup):
    model, fakes, bufs = setup
    grads = {t: _grads(model, t, s) for t, s in (("a", 1), ("b", 2))}
    for fake, buf in zip(fakes, bufs):
        buf.start(["a", "b"])
        for t in ("a", "b"):
            fake.write(grads[t])
            buf.capture(t)
    body = list(model.body.parameters())
    full = torch.stack([torch.cat([grads[t][p].flatten() for p in body]) for t in ("a", "b")])  # [K, P]
    partial = [block_gram(b.G, b.blocks) for b in bufs]
    gram = sum(partial)  # what GramOnlyReducer's all-reduce sums
    assert gram.shape == (2, 2, 2)  # [L, K, K]: body.0's block and body.1's
    torch.testing.assert_close(gram.sum(0), full.double() @ full.double().T)
    first = torch.cat([grads[t][p].flatten() for t in ("a", "b") for p in body[:2]]).view(2, -1).double()
    torch.testing.assert_close(gram[0], first @ first.T)  # block 0: body.0's columns alone
    w = torch.tensor([0.25, 2.0])
    for fake, buf in zip(fakes, bufs):
        buf.set_update(w, buf.G, buf.blocks)
        buf.hand_back(["a"])  # task b absent: its head gets nothing
    for p in body:  # each rank's partition of w @ G, at that parameter's place
        want = (w[0] * grads["a"][p] + w[1] * grads["b"][p]).flatten()
        got = torch.cat([fakes[r].get_local_fp32_grad_for_param(p) for r in range(WORLD)])[:p.numel()]
        torch.testing.assert_close(got, want)
    head_a = torch.cat([fakes[r].get_local_fp32_grad_for_param(model.heads.a.weight) for r in range(WORLD)])
    torch.testing.assert_close(head_a[:4], grads["a"][model.heads.a.weight].flatten())
    assert not any(f.get_local_fp32_grad_for_param(model.heads.b.weight).any() for f in fakes)


def test_a_layout_other_than_deepspeeds_is_refused():
    model = LayeredModel()
    with pytest.raises(RuntimeError, match="not laid out"):
        PartitionRows(FakeStage3(model, 0, shift=1), model, ["a", "b"])


def test_the_reducer_sums_only_the_gram_on_the_run_device():
    calls = []

    class Recorder:
        def all_reduce(self, t):
            calls.append((tuple(t.shape), t.dtype, t.device.type))

    from mtbert.distributed.collectives import Collectives
    coll = Collectives(2, "meta", ops=Recorder())
    rows = torch.zeros(3, 10, device="meta")
    gram, out, blocks, moved = GramOnlyReducer(coll, 12 * 4).reduce(rows, [], [(0, 10)])
    assert calls == [((1, 3, 3), torch.float64, "meta")] and out is rows
    assert moved == 3 * 12 * 4 * 1 + 2 * 9 * 8 // 2  # the engine's 3 reduce-scatters + the Gram
