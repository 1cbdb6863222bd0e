"""The loss-weighting methods (summed path) against references written here from each paper's
algorithm: FAMO against the authors' loop (torch Adam, autograd through the softmax), DWA and
RLW against their formulas, UW's gradient against the closed form."""

from __future__ import annotations

import pytest
import torch

from mtbert.config.schema import MethodCfg
from mtbert.optim.loss_weighting import LOSS_WEIGHTINGS, WeightingInputs, initial_state


def inputs(K, step=0, losses=None, log_vars=None, **cfg):
    return WeightingInputs(torch.arange(K), torch.Generator().manual_seed(step), MethodCfg(**cfg),
                           lambda: losses.detach().double(), log_vars)


def toy(K=3, P=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, P, P, generator=g, dtype=torch.float64)
    b = torch.randn(K, P, generator=g, dtype=torch.float64)
    return lambda th: ((A @ th - b) ** 2).sum(1) + 0.1  # [K] positive task losses


@pytest.mark.parametrize("K", [2, 3, 5])
def test_famo_follows_the_authors_loop(K):
    """Liu et al. 2023, Alg. 1 as the authors' code runs it: loss = sum log(L + eps) z / c with c
    detached; after the update delta = log L(theta_t) - log L(theta_t+1) on the same batch, the
    logits' gradient through softmax, torch Adam(lr 0.025, weight_decay 0.01)."""
    losses_of, lr = toy(K), 1e-3
    th_ref = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    th = th_ref.detach().clone().requires_grad_()
    w = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.025, weight_decay=0.01)
    spec, state, cfg = LOSS_WEIGHTINGS["famo"], initial_state("famo", K), MethodCfg(name="famo")
    for step in range(6):
        # the authors' code
        L = losses_of(th_ref)
        z = torch.softmax(w, -1)
        D = L + 1e-8
        c = (z / D).sum().detach()
        (grad_ref,) = torch.autograd.grad((D.log() * z / c).sum(), th_ref)
        with torch.no_grad():
            th_ref -= lr * grad_ref
        new = losses_of(th_ref).detach()
        delta = (L.detach() + 1e-8).log() - (new + 1e-8).log()
        (d,) = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)
        opt.zero_grad()
        w.grad = d
        opt.step()
        # mtbert's
        L2 = losses_of(th)
        total = spec.combine(list(L2), inputs(K, step, L2), state)
        (grad,) = torch.autograd.grad(total, th)
        with torch.no_grad():
            th -= lr * grad
        spec.after_step(state, torch.arange(K), L2.detach(), losses_of(th).detach(), cfg)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=0)
        torch.testing.assert_close(state["xi"], w.detach(), rtol=1e-10, atol=1e-14)
    assert (state["xi"] != 0).all()


def test_dwa_weights_are_the_paper_formula_over_windows():
    """Liu et al. 2019: w_k = K exp(r_k / T) / sum_j exp(r_j / T), r_k = Lbar_k(n-1) / Lbar_k(n-2)."""
    K, window, T = 3, 4, 2.0
    spec, state = LOSS_WEIGHTINGS["dwa"], initial_state("dwa", K)
    cfg = MethodCfg(name="dwa", dwa_window=window, dwa_temperature=T)
    hist = torch.rand(3 * window, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    parts = [torch.tensor(1.0, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    for step, losses in enumerate(hist):
        total = spec.combine(parts, inputs(K, dwa_window=window, dwa_temperature=T), state)
        got = torch.stack(torch.autograd.grad(total, parts))
        n = step // window  # windows completed before this step
        if n < 2:
            want = torch.ones(K, dtype=torch.float64)
        else:
            r = hist[(n - 1) * window:n * window].mean(0) / hist[(n - 2) * window:(n - 1) * window].mean(0)
            want = K * torch.softmax(r / T, 0)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        spec.after_step(state, torch.arange(K), losses, None, cfg)


def test_rlw_draws_softmax_of_normal_weights_from_the_step_generator():
    K = 3
    parts = [torch.tensor(1.0, dtype=torch.float64, requires_grad=True) for _ in range(K)]
    total = LOSS_WEIGHTINGS["rlw"].combine(parts, inputs(K, step=7), {})
    got = torch.stack(torch.autograd.grad(total, parts))
    want = torch.softmax(torch.randn(K, generator=torch.Generator().manual_seed(7), dtype=torch.float64), 0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    total8 = LOSS_WEIGHTINGS["rlw"].combine(parts, inputs(K, step=8), {})
    other = torch.stack(torch.autograd.grad(total8, parts))
    assert float(other.sum()) == pytest.approx(1.0) and not torch.allclose(other, got)  # a new draw each step


def test_uw_gradient_is_kendalls():
    """d/ds [L / (2 e^s) + s / 2] = 1/2 - L / (2 e^s); d/dL = 1 / (2 e^s)."""
    s = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    L = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (1.5, 0.4)]
    total = LOSS_WEIGHTINGS["uw"].combine(L, inputs(2, log_vars=s), {})
    gs, *gl = torch.autograd.grad(total, [s, *L])
    Lv = torch.tensor([1.5, 0.4], dtype=torch.float64)
    torch.testing.assert_close(gs, 0.5 - Lv / (2 * s.detach().exp()))
    torch.testing.assert_close(torch.stack(gl), 1 / (2 * s.detach().exp()))
