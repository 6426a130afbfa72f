"""The FOGZO estimate (docs/design.md §4.3): its statistics on problems with a known answer, and the
fast estimator against the reference that stores every direction, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import FOGZO
from metaste.optim.fogzo.estimator import fogzo_estimate
from metaste.optim.fogzo.smoothing import SMOOTHINGS
from tests.helpers.fogzo import batch, closure_for, managed_inputs, mlp
from tests.helpers.fogzo_reference import reference_estimate

# -- the estimator's statistics (docs/design.md §4.3) ------------------------------------------


def _quadratic_problem():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    A = m @ m.T / 6 + torch.eye(6, dtype=torch.float64)
    v = [
        torch.randn(3, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    ]
    center = torch.randn(6, generator=gen, dtype=torch.float64)
    eps = [torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64)]

    def loss():
        r = torch.cat(v) - center
        return float(0.5 * r @ A @ r)

    grad = A @ (torch.cat(v) - center)
    return v, eps, loss, grad


def _sample_G(v, eps, loss, g, beta, samples, kinds=("identity", "identity"), one_sided=False):
    out = []
    for t in range(samples):
        grads = [g[:3].clone(), g[3:].clone()]
        G, _ = fogzo_estimate(
            v, grads, eps, kinds, loss, beta=beta, n=1, seed=11, step=t, one_sided=one_sided, loss0=loss()
        )
        out.append(torch.cat(G))
    G = torch.stack(out)
    return G.mean(0), G.std(0) / math.sqrt(samples)


def _expected(beta, eps_vec, g, grad):
    """ε⁻¹ ⊙ (β ĝĝᵀ + (1−β) I)(ε ⊙ ∇L) with ĝ = ε⊙g/‖ε⊙g‖."""
    gh = eps_vec * g / torch.linalg.vector_norm(eps_vec * g)
    e = eps_vec * grad
    return (beta * gh * (gh @ e) + (1 - beta) * e) / eps_vec


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_mean_of_G_on_a_quadratic_matches_the_tilted_expectation(beta):
    v, eps, loss, grad = _quadratic_problem()
    eps_vec = torch.cat([eps[0].expand(3), eps[1].expand(3)])
    g = grad + torch.tensor([1.5, -1.0, 0.5, 2.0, 0.0, -1.0], dtype=torch.float64)  # a biased "STE" gradient
    mean, se = _sample_G(v, eps, loss, g, beta, 3000)
    want = _expected(beta, eps_vec, g, grad)
    assert torch.all((mean - want).abs() < 5 * se), (mean - want) / se
    if beta == 0.0:
        torch.testing.assert_close(want, grad)  # n-SPSA is unbiased for the quadratic
        assert torch.any((g - mean).abs() > 10 * se)  # and far from the STE's g
    else:  # power: normalizing g in raw v-coordinates (a plausible bug) lies > 8 s.e. away
        gr = g / torch.linalg.vector_norm(g)
        wrong = (beta * gr * (gr @ (eps_vec * grad)) + (1 - beta) * eps_vec * grad) / eps_vec
        assert torch.any((wrong - mean).abs() > 8 * se)


def test_one_sided_has_the_same_expectation():
    v, eps, loss, grad = _quadratic_problem()
    eps_vec = torch.cat([eps[0].expand(3), eps[1].expand(3)])
    mean, se = _sample_G(v, eps, loss, grad, 0.5, 3000, one_sided=True)
    assert torch.all((mean - _expected(0.5, eps_vec, grad, grad)).abs() < 5 * se)


def test_beta_one_with_an_exact_ste_returns_g_through_the_wrapper():
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(5, dtype=torch.float64))
    A = torch.randn(17, 17, dtype=torch.float64)
    A = A @ A.T
    opt = FOGZO(
        torch.optim.SGD([w1, w2], lr=0.0),
        beta_min=1.0,
        scales={w1: 0.01, w2: (lambda: torch.tensor(0.7, dtype=torch.float64), "identity")},
    )

    def loss():
        r = torch.cat([w1.flatten(), w2]) - 0.3
        return 0.5 * r @ A @ r + r.sum()

    opt.step(loss)
    r = torch.cat([w1.detach().flatten(), w2.detach()]) - 0.3
    grad = A @ r + 1
    G = torch.cat([w1.grad.flatten(), w2.grad])
    torch.testing.assert_close(G, grad, rtol=1e-6, atol=1e-9)


def test_staircase_expectation_is_the_epanechnikov_smoothing_not_the_ste():
    """L = Σ round(u), identity kind, β = 0: E[G](x) = 6x(1−x) on [0, ½] (the STE says 1)."""
    xs = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    v = [xs.clone()]
    eps = [torch.tensor(SMOOTHINGS["identity"].eps_bar, dtype=torch.float64)]  # s = 1

    def loss():
        return float(torch.round(v[0]).sum())

    out = []
    for t in range(4000):
        G, _ = fogzo_estimate(v, [None], eps, ["identity"], loss, beta=0.0, n=1, seed=5, step=t)
        out.append(G[0])
    G = torch.stack(out)
    mean, se = G.mean(0), G.std(0) / math.sqrt(len(out))
    want = 6 * xs * (1 - xs)
    assert torch.all((mean - want).abs() < 5 * se), (mean - want) / se
    assert torch.all(se < 0.06)  # precise enough that the STE's E[G] = 1 fails at 0, 0.1, 0.4, 0.5
    assert ((mean - 1).abs() > 5 * se).sum() >= 4


def test_beta_zero_ignores_g():
    model = mlp()
    x, y = batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    ws, gs, es, ks = managed_inputs(model)
    fake = [torch.randn_like(g) for g in gs]
    with torch.no_grad():
        G1, _ = fogzo_estimate(
            ws,
            [g.clone() for g in gs],
            es,
            ks,
            lambda: float(F.cross_entropy(model(x), y)),
            beta=0.0,
            n=2,
            seed=3,
            step=4,
        )
        G2, _ = fogzo_estimate(
            ws, fake, es, ks, lambda: float(F.cross_entropy(model(x), y)), beta=0.0, n=2, seed=3, step=4
        )
    assert all(torch.equal(a, b) for a, b in zip(G1, G2))


def test_nspsa_clean_pass_runs_without_backward():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(metaste.quant.lookup(p) is not None)  # only the managed weights train
    x, y = batch()
    modes = []

    def closure():
        modes.append(torch.is_grad_enabled())
        return F.cross_entropy(model(x), y)

    opt = FOGZO(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        beta_schedule=lambda t: 0.0,
    )
    opt.step(closure)
    assert modes == [False, False, False]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- the fast estimator equals the stored-d reference bitwise ------------------------------


@pytest.mark.parametrize(
    "n,one_sided,restore,beta,keep",
    [
        (1, False, "copy", 0.7, False),
        (3, False, "copy", 0.7, True),
        (2, False, "inplace", 0.7, False),
        (2, True, "inplace", 0.3, False),
        (2, True, "copy", 0.3, True),
        (1, False, "copy", 1.0, False),
        (2, False, "inplace", 0.0, False),
    ],
)
@pytest.mark.parametrize("variant", ["lsq-per-channel", "tanh", "approxsign"])
def test_fast_estimator_equals_the_stored_d_reference_bitwise(n, one_sided, restore, beta, keep, variant):
    build = {
        "lsq-per-channel": lambda: mlp(quantizer="lsq", per_channel=True),
        "tanh": lambda: mlp(binary="tanh"),
        "approxsign": lambda: mlp(binary="approxsign"),
    }[variant]
    fast, ref = build(), build()
    ref.load_state_dict(fast.state_dict())
    opt = FOGZO(
        torch.optim.SGD(fast.parameters(), lr=0.05),
        n=n,
        one_sided=one_sided,
        restore=restore,
        keep_noise=keep,
        beta_schedule=lambda t: beta,
        seed=9,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for t in range(3):
        x, y = batch(seed=t)
        opt.step(closure_for(fast, x, y))
        ref_opt.zero_grad(set_to_none=True)
        loss0 = F.cross_entropy(ref(x), y)
        loss0.backward()
        ws, gs, es, ks = managed_inputs(ref)
        with torch.no_grad():
            G, textbook, _, _ = reference_estimate(
                ws,
                gs,
                es,
                ks,
                lambda x=x, y=y: float(F.cross_entropy(ref(x), y)),
                beta=beta,
                n=n,
                seed=9,
                step=t,
                one_sided=one_sided,
                loss0=float(loss0),
                restore=restore,
            )
        for w, g, tb in zip(ws, G, textbook):
            torch.testing.assert_close(g, tb, rtol=1e-4, atol=1e-6)  # the algebra of §4.5 step 3
            w.grad = g
        ref_opt.step()
        for p, q in zip(fast.parameters(), ref.parameters()):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
