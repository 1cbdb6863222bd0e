"""The engines' contract with fakes (no process group, no DeepSpeed): what is stepped, when the
LR scheduler moves, what a parameter without a gradient gets, and what DeepSpeed is told."""

import types

import pytest
import torch

from mtbert.distributed.engines import DeepSpeedEngine, TorchEngine


class Counter:
    def __init__(self):
        self.n = 0

    def step(self):
        self.n += 1


def _torch_engine(idle="keep", clip=0.0):
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w, b], lr=0.1, weight_decay=0.5)
    sched = Counter()
    acc = types.SimpleNamespace(clip_grad_norm_=lambda ps, c: torch.nn.utils.clip_grad_norm_(ps, c))
    return TorchEngine(acc, None, opt, sched, [w, b], clip, idle, per_task=True), w, b, sched


def test_keep_leaves_a_parameter_without_gradient_alone_and_step_decays_it():
    for idle, moves in (("keep", False), ("step", True)):
        engine, w, b, sched = _torch_engine(idle)
        w.grad = torch.full((3,), 2.0)  # b got no gradient this step
        norm, applied = engine.step(per_task=True)
        assert applied and float(norm) == torch.tensor([2.0] * 3).norm().item()
        assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 * (2 + 0.5)))
        assert (not torch.equal(b.detach(), torch.ones(2))) == moves  # weight decay reaches b only with step
        assert sched.n == 1 and w.grad is None


def test_a_non_finite_norm_skips_the_update_but_not_the_schedule():
    engine, w, b, sched = _torch_engine()
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    norm, applied = engine.step(per_task=True)
    assert not applied and torch.isnan(norm) and torch.equal(w.detach(), torch.ones(3)) and sched.n == 1


def test_gse_first_update_does_not_move_the_schedule():
    engine, w, b, sched = _torch_engine()
    w.grad = torch.ones(3)
    engine.step(per_task=True, schedule=False)
    w.grad = torch.ones(3)
    engine.step(per_task=True)
    assert sched.n == 1


class FakeDeepSpeed:
    """Records what DeepSpeedEngine asks of a DeepSpeed engine."""

    lr_scheduler = None

    def __init__(self, applied=True):
        self.calls, self.applied = [], applied

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss):
        self.calls.append(("backward",))
        loss.backward()

    def step(self):
        self.calls.append(("step",))

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return 1.5

    def zero_grad(self):
        self.calls.append(("zero_grad",))


def _ds(applied=True):
    fake, sched = FakeDeepSpeed(applied), Counter()
    acc = types.SimpleNamespace(deepspeed_engine_wrapped=types.SimpleNamespace(engine=fake))
    return DeepSpeedEngine(acc, None, None, sched, [], 1.0, "step", per_task=False), fake, sched


def test_deepspeed_is_told_the_accumulation_boundary_and_steps_once_per_step():
    engine, fake, sched = _ds()
    x = torch.nn.Parameter(torch.ones(2))
    engine.backward((x * 2).sum() / 2, last=False)
    engine.backward((x * 2).sum() / 2, last=True)
    norm, applied = engine.step(per_task=False)
    assert fake.calls == [("boundary", False), ("backward",), ("boundary", True), ("backward",), ("step",)]
    assert applied and float(norm) == 1.5 and sched.n == 1


def test_a_step_deepspeed_skipped_is_reported_and_the_schedule_still_moves():
    engine, fake, sched = _ds(applied=False)
    norm, applied = engine.step(per_task=False)
    assert not applied and torch.isnan(norm) and sched.n == 1


def test_the_surrogate_hands_over_exactly_the_combined_gradient():
    engine, fake, sched = _ds()
    p = torch.nn.Parameter(torch.randn(4))
    g = torch.randn(4)
    engine.hand_over([(p, g)], schedule=False)
    assert torch.equal(p.grad, g) and sched.n == 0
    q = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))  # DeepSpeed bf16 parameters
    engine.hand_over([(q, g)])
    assert torch.equal(q.grad, g.bfloat16()) and sched.n == 1


def test_gse_second_update_gets_the_unclipped_head_gradients():
    """The first update clips in place and the private .grad are the buffers themselves: the
    engine must hand the second update copies (issue found by the equivalence matrix)."""
    from conftest import TwoTaskModel

    from mtbert.optim.gradients import GradientBuffers

    model = TwoTaskModel()
    buf = GradientBuffers(model, ["a", "b"])
    buf.start(["a", "b"])
    for t in ("a", "b"):
        buf.priv_flat[t].fill_(10.0)  # large: the first update's clip (at 1.0) scales them down
    buf.update.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = types.SimpleNamespace(clip_grad_norm_=None)
    engine = TorchEngine(acc, None, opt, Counter(), list(model.parameters()), 1.0, "keep", per_task=True)
    engine.apply_update(buf, ["a", "b"], None, last=False)
    head = model.heads["a"].weight
    assert head.grad is not None and torch.all(head.grad == 10.0)  # unclipped for the second update


def test_fp16_summed_path_scales_unscales_and_skips_an_overflow_step():
    """mtbert's fp16 on the summed path (any device): the engine back-propagates loss x scale,
    divides the gradients by the scale before the norm and the clipping, and skips a step whose
    norm is not finite; the next step works and sees the true gradient."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    w = torch.nn.Parameter(torch.ones(3))
    sched = Counter()
    engine = TorchEngine(acc, torch.nn.Identity(), torch.optim.SGD([w], lr=0.1), sched, [w], 1.0, "keep",
                         per_task=False)
    engine.backward((w * float("inf")).sum(), last=True, scale=2.0 ** 10)
    norm, applied = engine.step(per_task=False, scale=2.0 ** 10)
    assert not applied and not torch.isfinite(norm) and torch.equal(w.detach(), torch.ones(3)) and sched.n == 1
    engine.backward(w.sum() * 0.5, last=True, scale=2.0 ** 10)
    assert torch.equal(w.grad, torch.full((3,), 2.0 ** 9))  # scaled while it waits for the step
    norm, applied = engine.step(per_task=False, scale=2.0 ** 10)
    assert applied and float(norm) == pytest.approx(0.5 * 3 ** 0.5) and sched.n == 2
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 * 0.5))
