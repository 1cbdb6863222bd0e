"""Every collective receives tensors on the run device (NCCL takes CUDA tensors only).

No GPU here, so the run device is ``meta`` and the process group is a recorder: each path
that communicates (both reducers, the replica check, the logged losses) runs
against it, and every tensor it hands over must be on ``meta``. Reading a meta value back
after the collective fails by design; that is not what these tests look at."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import TwoTaskModel

from mtbert.distributed.collectives import CollectiveDeviceError, Collectives
from mtbert.distributed.replicas import ranks_agree
from mtbert.optim.gradients import GradientBuffers, make_reducer

PACKAGE = Path(__file__).resolve().parents[1] / "mtbert"


class Done:
    """A finished asynchronous collective."""

    def wait(self):
        pass


class RecordingGroup:
    """Stands in for torch.distributed: records (collective, devices of its tensors)."""

    def __init__(self):
        self.calls = []

    def all_reduce(self, t, op=None, async_op=False):
        self.calls.append(("all_reduce", t.device.type))
        return Done()

    def reduce_scatter_tensor(self, out, inp, async_op=False):
        self.calls.append(("reduce_scatter", out.device.type, inp.device.type))
        return Done()

    def all_gather_into_tensor(self, out, inp):
        self.calls.append(("all_gather", out.device.type, inp.device.type))

    def all_gather_object(self, out, obj):
        self.calls.append(("all_gather_object",))
        out[:] = [obj] * len(out)

    def barrier(self):
        self.calls.append(("barrier",))


def _read_back_ok(fn):
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as e:  # a meta value read back: not a collective
        assert "meta" in str(e).lower(), e


@pytest.mark.parametrize("blocks", ["whole", "layer"])
@pytest.mark.parametrize("reducer", ["allreduce", "sharded"])
def test_reducers_hand_only_run_device_tensors_to_collectives(reducer, blocks):
    group = RecordingGroup()
    coll = Collectives(world=2, device="meta", ops=group, rank=1)
    model = TwoTaskModel().to("meta")
    buf = GradientBuffers(model, ["a", "b"], world=2, gram_blocks=blocks)
    red = make_reducer(reducer, coll, 2)
    for k, t in enumerate(["a", "b"]):  # as step.py does after each task's backward
        red.launch(k, buf.G[k], buf.priv_flat[t])
    red.wait()
    gram, _, _, _ = red.reduce(buf.rows(["a", "b"]), [buf.priv_flat["a"], buf.priv_flat["b"]], buf.blocks, [0, 1])
    red.finish(buf.update)
    assert group.calls, "the reducer made no collective call"
    assert all(dev == "meta" for call in group.calls for dev in call[1:]), group.calls
    assert gram.device.type == "meta" and gram.shape == (len(buf.blocks), 2, 2)


def test_the_loss_weightings_global_losses_reduce_on_the_run_device():
    """DWA and FAMO all-reduce the step's task losses (host scalars or CPU tensors in the step)."""
    from types import SimpleNamespace

    from mtbert.training.step import Stepper
    group = RecordingGroup()
    coll = Collectives(world=2, device="meta", ops=group)
    _read_back_ok(lambda: Stepper._global_losses(SimpleNamespace(collectives=coll),
                                                 [torch.tensor(1.0), torch.tensor(2.0)]))
    assert group.calls and all(dev == "meta" for call in group.calls for dev in call[1:]), group.calls


def test_replica_check_and_loss_logging_use_the_run_device():
    from mtbert.training.run import global_mean_losses
    group = RecordingGroup()
    coll = Collectives(world=2, device="meta", ops=group)
    _read_back_ok(lambda: ranks_agree(TwoTaskModel().to("meta"), coll))
    _read_back_ok(lambda: global_mean_losses({"loss/a": [torch.tensor(1.0)]}, coll))
    assert [c[0] for c in group.calls] == ["all_gather", "all_reduce"]
    assert all(dev == "meta" for call in group.calls for dev in call[1:]), group.calls


def test_a_host_tensor_on_a_gpu_run_is_refused_with_a_message():
    coll = Collectives(world=2, device="meta", ops=RecordingGroup())
    with pytest.raises(CollectiveDeviceError, match="process group serves meta"):
        coll.all_reduce_sum_(torch.zeros(3))  # what the old replica check did under NCCL
    with pytest.raises(CollectiveDeviceError):
        coll.all_gather_into(torch.zeros(4, device="meta"), torch.zeros(2))


def test_one_process_needs_no_process_group():
    coll = Collectives(world=1, device="cpu")
    t = torch.ones(3)
    coll.all_reduce_mean_(t)
    assert coll.all_equal(t) and coll.gather_objects(5) == [5]


def test_only_collectives_py_touches_torch_distributed():
    """Grep-level review: every collective in the package goes through mtbert/distributed/collectives.py."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "collectives.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr == "distributed":
                names = ["torch.distributed"]
            # FSDP2's sharding API (engines/fsdp2.py: fully_shard, DTensor, the whole-state-dict helpers):
            # no process group of its own; its collectives run on the mesh that Collectives.device_mesh
            # builds on the run device.
            sharding = path.name == "fsdp2.py" and all(
                n.startswith(("torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint"))
                for n in names)
            if any(n.startswith("torch.distributed") for n in names) and not sharding:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, f"torch.distributed used outside mtbert/distributed/collectives.py: {offenders}"
