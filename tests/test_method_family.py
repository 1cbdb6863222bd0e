"""Every aggregator on random Gram matrices, K = 2..6, full rank, rank-deficient and with one
zero task gradient: finite weights, no silent zero step (zero only where the method defines it:
0 in the convex hull of the gradients, a Pareto-stationary point), and each new method's
defining property to a stated tolerance. Reference values from torchjd's tests where it has
them (its ``test_values.py``: J_base = [[-4, 1, 1], [6, 1, 1]])."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from mtbert.config.schema import MethodCfg
from mtbert.optim.aggregators import AGGREGATORS, GramInputs, aggregate, initial_state, update_weights
from mtbert.optim.aggregators.conditioned import pcd_solve
from mtbert.optim.aggregators.nash import ridged
from mtbert.optim.aggregators.robust import coordinate_uniform, graddrop_columns, krum_weights, trimmed_mean_columns
from mtbert.optim.aggregators.stochastic import gradnorm_move, modo_step, sdmgrad_step, simplex_projection

GRAM_METHODS = sorted(n for n, a in AGGREGATORS.items() if a.fn is not None and n != "gse")
KINDS = ("full", "rank_deficient", "zero_task")
J_BASE = torch.tensor([[-4.0, 1, 1], [6, 1, 1]], dtype=torch.float64)


def gradients(K: int, kind: str, seed: int, P: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(K, 1, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-2, 3, (K, 1), generator=g).double()
    if kind == "rank_deficient":  # rank max(1, K - 2): some gradients are combinations of others
        G = torch.randn(K, max(1, K - 2), generator=g, dtype=torch.float64) @ torch.randn(max(1, K - 2), P, generator=g,
                                                                                             dtype=torch.float64)
    else:
        G = torch.randn(K, P, generator=g, dtype=torch.float64)
    G = G * scales
    if kind == "zero_task":
        G[-1] = 0
    return G


def hull_distance(G: torch.Tensor) -> float:
    """min ||G^T w|| over the simplex, relative to the largest gradient (0: 0 is in the hull)."""
    K = G.shape[0]
    A = np.vstack([G.numpy().T, 1e3 * np.ones((1, K))])  # the simplex constraint, heavily weighted
    w, _ = nnls(A, np.concatenate([np.zeros(G.shape[1]), [1e3]]))
    return float(np.linalg.norm(G.numpy().T @ w) / G.norm(dim=1).max())


def run(name: str, G: torch.Tensor, cfg: MethodCfg | None = None, state=None, seed: int = 0) -> torch.Tensor:
    K = G.shape[0]
    losses = torch.linspace(0.5, 2.0, K, dtype=torch.float64)
    return update_weights(name, G @ G.T, torch.Generator().manual_seed(seed), cfg=cfg or MethodCfg(name=name),
                          state=state, losses=losses)[0]


@pytest.mark.parametrize("name", GRAM_METHODS)
def test_every_gram_method_is_finite_and_never_a_silent_zero_step(name):
    for K in range(2, 7):
        for kind in KINDS:
            for seed in range(3):
                G = gradients(K, kind, seed)
                w = run(name, G)
                assert torch.isfinite(w).all(), f"{name} K={K} {kind} seed {seed}: {w}"
                d = w @ G
                if float(d.norm()) > 1e-9 * float(G.norm(dim=1).max()):
                    continue
                # zero only where the method says so
                allowed = hull_distance(G) < 1e-6 or (name == "krum" and bool((G[w > 0].norm(dim=1) == 0).all()))
                assert allowed, f"{name} K={K} {kind} seed {seed}: a zero update while 0 is not in the hull"


def test_imtl_g_is_never_zero_and_equalises_projections_where_it_can():
    """Full rank: equal projections on the unit gradients; linearly dependent gradients (the issue's
    K = 3, rank 2): the minimum-norm least-squares direction of U d = 1, not the zero update."""
    w = run("imtl_g", J_BASE)
    assert torch.allclose(w, torch.tensor([0.5923, 0.4077], dtype=torch.float64), atol=1e-4)  # torchjd
    for K in range(2, 7):
        for kind in KINDS:
            G = gradients(K, kind, K)
            d = run("imtl_g", G) @ G
            alive = G.norm(dim=1) > 0
            U = G[alive] / G[alive].norm(dim=1, keepdim=True)
            ref = torch.from_numpy(np.linalg.lstsq(U.numpy(), np.ones(int(alive.sum())), rcond=None)[0])
            assert float(d.norm()) > 0, f"K={K} {kind}: zero update"
            cos = float(d @ ref / (d.norm() * ref.norm()))
            assert cos > 1 - 1e-9, f"K={K} {kind}: not the least-squares direction (cos {cos})"
            if kind != "rank_deficient":
                proj = U @ d
                assert float(proj.max() - proj.min()) <= 1e-8 * float(proj.abs().max()), f"K={K} {kind}: {proj}"


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_meets_its_fixed_point(alpha):
    cfg = MethodCfg(name="fairgrad", fairgrad_alpha=alpha)
    if alpha == 1.0:  # torchjd's reference (its least_squares stops at 1e-8: 1e-3 here)
        assert torch.allclose(run("fairgrad", J_BASE, cfg), torch.tensor([0.5915, 0.4071], dtype=torch.float64), atol=1e-3)
    for K in range(2, 7):
        G = gradients(K, "full", K)
        w = run("fairgrad", G, cfg)
        M = ridged(G @ G.T)  # (1e-10 of the mean squared norm on the diagonal: see nash.py)
        utility = M @ w  # g_i . d
        assert (w > 0).all()
        err = float(((utility - w.pow(-1 / alpha)) / w.pow(-1 / alpha)).abs().max())
        assert err < 1e-8, f"K={K}: (M w)_i vs w_i^(-1/alpha): {err:.1e}"
    assert (run("fairgrad", J_BASE, MethodCfg(name="fairgrad", fairgrad_alpha=0.0)) == 0.5).all()  # alpha 0: the mean


def test_config_has_equal_positive_cosines_and_the_projections_length():
    assert torch.allclose(run("config", J_BASE) @ J_BASE, torch.tensor([0.1588, 2.0706, 2.0706], dtype=torch.float64),
                          atol=1e-4)  # torchjd's reference
    for K in range(2, 7):
        G = gradients(K, "full", K) if K <= 5 else gradients(K, "zero_task", K)
        d = run("config", G) @ G
        alive = G.norm(dim=1) > 0
        cos = G[alive] @ d / (G[alive].norm(dim=1) * d.norm())
        assert float(cos.min()) > 0 and float(cos.max() - cos.min()) < 1e-9, f"K={K}: {cos}"
        u = d / d.norm()
        assert torch.allclose(d.norm(), (G @ u).sum(), rtol=1e-9)


def test_pcd_satisfies_its_kkt_conditions_and_keeps_the_primary_norm():
    for K in range(2, 7):
        for kind in KINDS:
            for tau in (0.02, 0.5):
                G = gradients(K, kind, 10 * K + int(tau * 10))
                Mh = G @ G.T
                w_hat = pcd_solve(Mh, tau)
                mu, slack = w_hat[1:], (Mh @ w_hat)[1:] - tau * Mh.diagonal()[1:]
                scale = float(Mh.diagonal().max())
                if bool((w_hat[1:] == 0).all()) and bool((slack < -1e-9 * scale).any()):
                    continue  # infeasible: the primary gradient (checked below for a known case)
                assert (mu >= 0).all() and (slack >= -1e-7 * scale).all(), f"K={K} {kind} tau={tau}"
                assert float((mu * slack).abs().max()) <= 1e-7 * scale * (1 + float(mu.max())), "complementarity"
                cfg = MethodCfg(name="pcd", pcd_tau=tau)
                d = run("pcd", G, cfg) @ G
                assert torch.allclose(d.norm(), G[0].norm(), rtol=1e-9), "rescaled to the primary gradient's norm"
    G = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, -1, 0]], dtype=torch.float64)  # secondaries pull apart
    assert torch.equal(pcd_solve(G @ G.T, 0.1), torch.tensor([1.0, 0, 0], dtype=torch.float64))


def test_sdmgrad_and_modo_follow_their_recurrences_on_the_simplex():
    # torchjd's SDMGrad recurrence (n_iter 1, lambda 0.3), then a warm-started second call
    w, out = sdmgrad_step(torch.diag(torch.tensor([1, 0.25, 0], dtype=torch.float64)),
                          torch.full((3,), 1 / 3, dtype=torch.float64), 0.3, iters=1)
    assert torch.allclose(out, torch.tensor([1, 1, 11], dtype=torch.float64) / 13)
    assert torch.allclose(sdmgrad_step(torch.eye(3, dtype=torch.float64), w, 0.3, iters=1)[1],
                          torch.tensor([6, 6, 1], dtype=torch.float64) / 13)
    for K in range(2, 7):
        for kind in KINDS:
            G = gradients(K, kind, K)
            M = G @ G.T
            state = initial_state("modo", K, 1)
            lam = torch.full((K,), 1 / K, dtype=torch.float64)
            for step in range(3):  # the state carries lambda between steps
                lam = modo_step(M, lam, 0.1, 0.1)
                assert torch.allclose(run("modo", G, state=state), lam, rtol=1e-12, atol=1e-15)
            out = run("sdmgrad", G)
            assert (out >= 0).all() and torch.isclose(out.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_simplex_projection_is_the_closest_point():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        y = torch.randn(5, generator=g, dtype=torch.float64) * 3
        p = simplex_projection(y)
        assert (p >= 0).all() and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
        for _ in range(20):  # no simplex point is closer
            q = simplex_projection(p + 0.1 * torch.randn(5, generator=g, dtype=torch.float64))
            assert (y - p).norm() <= (y - q).norm() + 1e-12


def test_cr_mogm_is_a_moving_average_of_its_inner_method():
    G1, G2 = gradients(4, "full", 1), gradients(4, "full", 2)
    cfg = MethodCfg(name="cr_mogm", cr_mogm_alpha=0.9)
    state = initial_state("cr_mogm", 4, 1)
    first = run("cr_mogm", G1, cfg, state)
    assert torch.allclose(first, run("mgda", G1))  # w_0: the inner weights
    second = run("cr_mogm", G2, cfg, state)
    assert torch.allclose(second, 0.9 * first + 0.1 * run("mgda", G2), rtol=1e-12)
    assert torch.allclose(run("cr_mogm", G2, MethodCfg(name="cr_mogm", cr_mogm_alpha=0.0), state), run("mgda", G2))


def test_gradnorm_moves_weights_towards_its_targets_and_keeps_their_sum():
    norms = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    w = gradnorm_move(torch.ones(3, dtype=torch.float64), norms, torch.ones(3, dtype=torch.float64), 1.5, 0.1)
    assert torch.isclose(w.sum(), torch.tensor(3.0, dtype=torch.float64))
    assert w[0] > 1 > w[2], "the small-norm task gains weight, the large-norm one loses"
    G = gradients(3, "full", 0)
    state = initial_state("gradnorm", 3, 1)
    assert torch.equal(run("gradnorm", G, state=state), torch.ones(3, dtype=torch.float64))  # the first step: 1
    assert not torch.equal(state["w"], torch.ones(3, dtype=torch.float64)) and torch.isclose(state["w"].sum(),
                                                                                         torch.tensor(3.0, dtype=torch.float64))


def test_krum_selects_the_gradients_closest_to_their_neighbours():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.1 + 1
    G[2] = torch.tensor([-20.0, 30, 5], dtype=torch.float64)  # the outlier
    w = krum_weights(G @ G.T, byzantine=1, selected=4)
    assert w[2] == 0 and torch.allclose(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    d2 = ((G[:, None] - G[None]) ** 2).sum(-1)
    scores = torch.stack([torch.sort(torch.cat([d2[i, :i], d2[i, i + 1:]])).values[:2].sum() for i in range(5)])
    assert int(torch.argmin(scores)) == int(torch.argmax(krum_weights(G @ G.T, 1, 1)))
    assert torch.equal(krum_weights(G[:3] @ G[:3].T, 1, 1), torch.full((3,), 1 / 3, dtype=torch.float64))  # k < f + 3


def test_trimmed_mean_and_graddrop_per_coordinate():
    R = torch.tensor([[1e11, 3], [1, -1e11], [-1e10, 1e10], [2, 2]], dtype=torch.float64)
    inputs = GramInputs(None, None, torch.Generator().manual_seed(0), MethodCfg(trim=1))
    assert torch.equal(trimmed_mean_columns(R, None, inputs), torch.tensor([1.5, 2.5], dtype=torch.float64))  # torchjd
    # GradDrop against its rule with the same draws; columns of one sign are kept whole
    rows = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows[:, :10] = rows[:, :10].abs()
    coords = torch.arange(1000)
    inputs = GramInputs(None, None, torch.Generator().manual_seed(3), MethodCfg())
    got = graddrop_columns(rows, coords, inputs)
    key = int(torch.randint(0, 1 << 62, (1,), generator=torch.Generator().manual_seed(3)))
    u = coordinate_uniform(coords, key)
    P = 0.5 * (1 + rows.sum(0) / rows.abs().sum(0))
    want = torch.tensor([sum(float(x) for x in rows[:, j] if (x > 0 and P[j] > u[j]) or (x < 0 and P[j] < u[j]))
                      for j in range(1000)], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    assert torch.equal(got[:10], rows[:, :10].sum(0))
    # the draws: uniform, and a function of the coordinate alone (any shard gives the same value)
    assert abs(float(u.mean()) - 0.5) < 0.03 and torch.equal(coordinate_uniform(coords[500:], key), u[500:])


def test_a_stateful_method_keeps_its_absent_tasks_state():
    for name in ("fairgrad", "pcd", "sdmgrad", "modo", "cr_mogm", "gradnorm"):
        state = initial_state(name, 4, 1)
        before = {k: v.clone() for k, v in state.items()}
        G = gradients(2, "full", 0)
        aggregate(name, GramInputs((G @ G.T)[None], torch.tensor([1, 3]), None, MethodCfg(name=name),
                                   lambda: torch.tensor([1.0, 2.0], dtype=torch.float64)), state)
        for k, v in state.items():
            assert torch.equal(v[[0, 2]], before[k][[0, 2]]), f"{name}: {k} of an absent task changed"


def test_gls_and_stch_weights_are_the_gradients_of_their_objectives():
    from mtbert.optim.loss_weighting import gls_coefficients, stch_coefficients
    L = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(L.prod().pow(1 / 3), L)  # the geometric mean, written as a product
    assert torch.allclose(gls_coefficients(L.detach()), g, rtol=1e-12)
    nadir = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(stch_coefficients(L.detach(), nadir, 1.0), torch.tensor([1, 1, 0.5], dtype=torch.float64))
    for mu in (0.1, 1.0, 3.0):  # 3 mu log sum exp(log(L / z) / mu)
        (g,) = torch.autograd.grad(3 * mu * torch.logsumexp((L / nadir).log() / mu, 0), L)
        assert torch.allclose(stch_coefficients(L.detach(), nadir, mu), g, rtol=1e-12)
    assert torch.allclose(stch_coefficients(L.detach(), None, 1.0), 1 / L.detach())  # the warm-up: sum log L


def _column_run(name: str, steps: list[torch.Tensor], cfg: MethodCfg | None = None, losses=None):
    """One process, whole rows: the updates of a per-coordinate-state method over several steps."""
    from mtbert.optim.aggregators import combine_columns, initial_column_state
    K = steps[0].shape[0]
    cfg = cfg or MethodCfg(name=name)
    state, cols, out = initial_state(name, K, 1), initial_column_state(name, K, steps[0].shape[1], steps[0]), []
    for i, rows in enumerate(steps):
        L = losses[i] if losses is not None else torch.ones(K, dtype=torch.float64)
        inputs = GramInputs(None, torch.arange(K), None, cfg, lambda L=L: L, cols)
        out.append(combine_columns(name, rows, None, inputs, state))
    return out, state, cols


def test_excess_mtl_weights_grow_with_the_excess_risk_on_the_simplex():
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 50, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [1.0], [3.0]],
                                                                                   dtype=torch.float64)
             for _ in range(4)]
    out, state, cols = _column_run("excess_mtl", steps)
    assert torch.allclose(out[0], steps[0].mean(0))  # the first step records e0: uniform weights
    a = state["a"]
    assert torch.isclose(a.sum(), torch.tensor(1.0, dtype=torch.float64)) and (a > 0).all()
    S = sum(s * s for s in steps)
    assert torch.equal(cols["S"], S), "the running sum of squared gradients, per coordinate"
    # the reference recurrence (torchjd's ExcessMTL after LibMTL's first step)
    S_, a_, e0 = torch.zeros_like(steps[0]), torch.full((3,), 1 / 3, dtype=torch.float64), None
    for rows in steps:
        S_ += rows * rows
        e = (rows * rows / (S_ + 1e-7).sqrt()).sum(1)
        if e0 is None:
            e0 = e
            continue
        a_ = a_ * torch.exp(e / (e0 + 1e-7))
        a_ = a_ / a_.sum()
    assert torch.allclose(a, a_, rtol=1e-12) and torch.allclose(out[-1], a_ @ steps[-1], rtol=1e-12)


def test_moco_tracks_the_gradients_and_steps_along_the_estimates():
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(3, 40, generator=g, dtype=torch.float64) for _ in range(3)]
    cfg = MethodCfg(name="moco", moco_gamma=0.1, moco_rho=0.1)
    out, state, cols = _column_run("moco", steps, cfg)
    Y, lam = torch.zeros_like(steps[0]), torch.full((3,), 1 / 3, dtype=torch.float64)
    for t, rows in enumerate(steps, 1):  # the paper's recurrence with LibMTL's/torchjd's softmax
        Y = Y - 0.5 / t ** 0.5 * (Y - rows)
        lam = torch.softmax(lam - 0.1 / t ** 0.5 * (Y @ Y.T @ lam + 0.1 * lam), 0)
        if t == 1:
            assert torch.allclose(Y, 0.5 * steps[0])  # torchjd's first-call value
    assert torch.allclose(cols["Y"], Y, rtol=1e-12) and torch.allclose(state["lam"], lam, rtol=1e-12)
    assert torch.allclose(out[-1], lam @ Y, rtol=1e-12), "the update is lambda^T Y, not this step's gradients"


def test_db_mtl_scales_every_buffer_to_the_largest_norm():
    g = torch.Generator().manual_seed(2)
    steps = [torch.randn(3, 30, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [10.0]],
                                                                                  dtype=torch.float64)
             for _ in range(3)]
    losses = [torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)] * 3
    out, state, cols = _column_run("db_mtl", steps, losses=losses)
    B = torch.zeros_like(steps[0])
    for rows, L in zip(steps, losses):
        B = 0.9 * B + 0.1 * rows / (L[:, None] + 1e-8)
    assert torch.allclose(cols["B"], B, rtol=1e-12)
    norms = B.norm(dim=1)
    assert torch.allclose(out[-1], ((norms.max() / (norms + 1e-8))[:, None] * B).sum(0), rtol=1e-12)
    scaled = (norms.max() / (norms + 1e-8))[:, None] * B
    assert torch.allclose(scaled.norm(dim=1), norms.max().expand(3), rtol=1e-6), "every term at the largest norm"


def test_the_new_methods_are_refused_on_several_processes_where_the_matrix_has_not_run_them():
    from mtbert.config.cli import parse_args
    from mtbert.distributed.accelerator import refuse_unproved_new_method
    from mtbert.errors import ConfigError
    proved = parse_args(["--method.name=graddrop"])
    for stage, fsdp in ((0, False), (2, False), (3, False), (0, True)):
        refuse_unproved_new_method(proved, stage, fsdp, "no")  # what FAMILY runs: accepted
    for extra, field in ((["--train.schedule=proportional"], "train.schedule"), (["--train.grad_accum=2"], "train.grad_accum"),
                         (["--method.smart=true"], "method.smart"), (["--train.ema_decay=0.5"], "train.ema_decay")):
        with pytest.raises(ConfigError, match=field):
            refuse_unproved_new_method(parse_args(["--method.name=moco", *extra]), 0, False, "no")
    with pytest.raises(ConfigError, match="train.precision"):
        refuse_unproved_new_method(proved, 2, False, "bf16")
    with pytest.raises(ConfigError, match="ZeRO-1"):
        refuse_unproved_new_method(proved, 1, False, "no")
    with pytest.raises(ConfigError, match="FSDP2"):
        refuse_unproved_new_method(parse_args(["--method.name=krum"]), 0, True, "no")
    refuse_unproved_new_method(parse_args(["--method.name=pcgrad", "--train.grad_accum=2"]), 1, False, "bf16")  # proved
