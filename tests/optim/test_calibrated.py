"""Calibrated surrogate (docs/design.md §9): recovery of a known Jacobian, bitwise plain STE with
probes off, ĉ = the autograd directional derivative, the solve = batch least squares, fallbacks,
checkpoints, validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import Calibrated
from metaste.optim.calibrated import probe_features
from metaste.optim.core.noise import derive_seed, noise, rademacher
from metaste.optim.fogzo.smoothing import SMOOTHINGS
from metaste.quant.leaky import LeakySurrogate
from metaste.quant.psi import band
from metaste.quant.quantizers import Quantizer
from metaste.quant.registry import register
from tests.helpers.lockstep import assert_lockstep, assert_twins


def mlp(surrogate="leaky", quantizer="fixed", granularity="tensor", seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    kw = {"granularity": granularity} if surrogate == "leaky" else {}
    return metaste.quantize_model(net, bits=2, quantizer=quantizer, surrogate=surrogate, **kw)


def batch(seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=g), torch.randint(0, 4, (size,), generator=g)


# -- the stand-in: a differentiable Ψ with a known Jacobian (a* in the band, λ* outside) --------


class _StandInFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, q):
        u = v / q.s
        lo, hi = -q.qn, q.qp
        psi_u = torch.where(
            u > hi,
            q.a_true * hi + q.l_true * (u - hi),
            torch.where(u < lo, q.a_true * lo + q.l_true * (u - lo), q.a_true * u),
        )
        ctx.save_for_backward(u)
        ctx.q = q
        return psi_u * q.s

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        q = ctx.q
        return (g if q.defer_surrogate else g * q.surrogate.psi(u, q.qn, q.qp)), None


class StandInQuantizer(Quantizer):
    def __init__(self, shape, a_true, l_true, s=0.3):
        super().__init__(LeakySurrogate(shape, "tensor"))
        self.bits, self.qn, self.qp = 2, 2, 1
        self.a_true, self.l_true = a_true, l_true
        self.register_buffer("s", torch.tensor(s))

    def scale(self, weight):
        return self.s

    def forward(self, weight):
        return _StandInFn.apply(weight, self)


class StandInLinear(nn.Module):
    def __init__(self, i, o, a_true, l_true):
        super().__init__()
        # u = v/s at least ½ away from the band edges −2 and 1: a probe (|εz| ≤ s/2) never crosses
        # a kink of Ψ, so the measured derivative is Ψ' itself (up to curvature)
        u = torch.rand(o, i) * 2 - 1.5  # inside: [−1.5, 0.5]
        out = torch.rand(o, i) < 0.4
        far = torch.where(torch.rand(o, i) < 0.5, -2.5 - torch.rand(o, i), 1.5 + torch.rand(o, i))
        self.weight = nn.Parameter(torch.where(out, far, u) * 0.3)
        self.q = StandInQuantizer(self.weight.shape, a_true, l_true)
        register(self.weight, self.q)

    def forward(self, x):
        return F.linear(x, self.q(self.weight))


def test_recovers_known_jacobian_per_layer():
    torch.manual_seed(0)
    truth = [(0.6, 0.3), (1.4, 0.0)]
    net = nn.Sequential(StandInLinear(8, 16, *truth[0]), nn.Tanh(), StandInLinear(16, 4, *truth[1]))
    for layer in (net[0], net[2]):
        u = layer.weight / layer.q.s
        out = 1 - float(band(u, -2, 1).mean())
        assert 0.2 < out < 0.8  # both regions are populated
    opt = Calibrated(torch.optim.SGD(net.parameters(), lr=0.0), every=1, rho=1.0, ridge=0.0)
    for t in range(250):
        x, y = batch(seed=t)
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    assert opt.probes == 250
    got = opt.layer_means()
    for (a, lam), (a_t, l_t) in zip(got, truth):
        assert a == pytest.approx(a_t, abs=0.03)
        assert lam == pytest.approx(l_t, abs=0.03)


# -- bitwise the plain STE with the probes off ---------------------------------------------------


@pytest.mark.parametrize("quantizer", ["fixed", "lsq"])
def test_probes_off_is_bitwise_plain_ste(quantizer):
    ref, cal = mlp("ste", quantizer), mlp("leaky", quantizer)
    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = Calibrated(torch.optim.SGD(cal.parameters(), lr=0.1, momentum=0.9), every=None)
    assert_lockstep(ref, base, cal, opt, [batch(seed=t) for t in range(8)])


# -- ĉ_i = ⟨surrogate gradient, ε⊙d_i⟩ by autograd ---------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_prediction_is_autograd_directional_derivative(beta):
    net = mlp(granularity="channel")
    managed = [e for _, e in metaste.quantized_weights(net)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for e in managed:
            e.surrogate.a.copy_(0.5 + 1.5 * torch.rand(e.surrogate.a.shape, generator=g))
            e.surrogate.lam.copy_(torch.rand(e.surrogate.lam.shape, generator=g))
    x, y = batch()
    # the surrogate gradient g⊙ψ(u; θ), by ordinary autograd
    F.cross_entropy(net(x), y).backward()
    sgrads = [e.weight.grad.clone() for e in managed]
    net.zero_grad()
    # the raw g = ∂L/∂v̂ (deferred ψ), as the wrapper sees it
    for e in managed:
        e.quantizer.defer_surrogate = True
    F.cross_entropy(net(x), y).backward()
    raw = [e.weight.grad.clone() for e in managed]
    eps = [e.scale() * SMOOTHINGS[e.ste_kind].eps_bar for e in managed]
    kinds = [e.ste_kind for e in managed]
    inside = [band(e.u(), -e.qn, e.qp) for e in managed]
    feats = probe_features(
        raw,
        sgrads,
        inside,
        eps,
        kinds,
        [e.surrogate.a.shape for e in managed],
        beta=beta,
        n=3,
        seed=5,
        step=7,
    )
    theta = torch.cat([t.reshape(-1).double() for e in managed for t in (e.surrogate.a, e.surrogate.lam)])
    norm = math.sqrt(sum(float(((s * ep) ** 2).sum()) for s, ep in zip(sgrads, eps)))
    for i in range(3):
        sigma = rademacher(5, 7, i)
        expected = 0.0
        for k, (e, s, ep) in enumerate(zip(managed, sgrads, eps)):
            z = noise(kinds[k], e.weight.shape, derive_seed(5, 7, i, k), e.weight.device, torch.float64)
            d = math.sqrt(1 - beta) * z + math.sqrt(beta) * sigma * (ep * s).double() / norm
            expected += float((s.double() * ep.double() * d).sum())
        assert float(feats[i] @ theta) == pytest.approx(expected, rel=1e-5, abs=1e-9)


# -- the solve equals a batch (weighted, ridge) least-squares fit on the stored probes ----------


@pytest.mark.parametrize("rho,ridge", [(1.0, 0.0), (0.8, 0.3)])
def test_solve_equals_batch_least_squares(rho, ridge):
    net = mlp(granularity="channel")
    opt = Calibrated(
        torch.optim.SGD(net.parameters(), lr=0.05), every=2, n=2, rho=rho, ridge=ridge, ridge_to="ste",
        a_range=(1e-3, 1e3), lam_max=1e3,
    )  # fmt: skip
    stored = []
    add = opt.normal.add
    opt.normal.add = lambda Fm, c: (stored.append((Fm.clone(), c.clone())), add(Fm, c))
    for t in range(60):
        x, y = batch(seed=t)
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    rows, targets, weights = [], [], []
    for age, (Fm, c) in enumerate(reversed(stored)):
        rows.append(Fm.numpy())
        targets.append(c.numpy())
        weights.append(np.full(len(c), rho**age))
    Fa, ca, w = np.concatenate(rows), np.concatenate(targets), np.concatenate(weights)
    d = (w[:, None] * Fa * Fa).sum(0)
    mu = ridge * d + 1e-9 * d.mean()
    ref = opt._ste_theta().numpy()
    X = np.concatenate([np.sqrt(w)[:, None] * Fa, np.diag(np.sqrt(mu))])
    Y = np.concatenate([np.sqrt(w) * ca, np.sqrt(mu) * ref])
    expected = np.linalg.lstsq(X, Y, rcond=None)[0]
    tol = dict(rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(opt.normal.solve(torch.from_numpy(ref)).numpy(), expected, **tol)
    # what the surrogates hold: the fit, clamped (a ∈ [1e−3, 1e3], λ ∈ [0, 1e3])
    is_a = np.concatenate(
        [np.r_[np.ones(m.surrogate.a.numel()), np.zeros(m.surrogate.a.numel())] for m in opt.managed]
    )
    lo = np.where(is_a == 1, 1e-3, 0.0)
    np.testing.assert_allclose(opt.theta().numpy(), np.clip(expected, lo, 1e3), **tol)


def test_clamps_a_and_lambda():
    net = mlp()
    opt = Calibrated(
        torch.optim.SGD(net.parameters(), lr=0.05), every=1, ridge=0.0, a_range=(0.9, 1.1), lam_max=0.05
    )
    for t in range(20):
        x, y = batch(seed=t)
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    th = opt.theta().view(-1, 2)
    assert bool((th[:, 0] >= 0.9 - 1e-7).all() and (th[:, 0] <= 1.1 + 1e-7).all())
    assert bool((th[:, 1] >= 0).all() and (th[:, 1] <= 0.05 + 1e-7).all())


# -- fallbacks, checkpoints, validation -----------------------------------------------------------


def test_nonfinite_probe_loss_falls_back_to_surrogate_gradient():
    net, ref = mlp(), mlp()
    opt = Calibrated(torch.optim.SGD(net.parameters(), lr=0.1), every=1)
    base = torch.optim.SGD(ref.parameters(), lr=0.1)
    calls = []
    x, y = batch()

    def closure():
        calls.append(1)
        loss = F.cross_entropy(net(x), y)
        return loss * math.inf if len(calls) == 2 else loss

    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure)
    assert opt.fallbacks == 1 and opt.probes == 0
    F.cross_entropy(ref(x), y).backward()
    base.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_resumes_identical_trajectory():
    net = mlp()
    opt = Calibrated(torch.optim.Adam(net.parameters(), lr=0.01), every=3, seed=4)
    for t in range(7):
        x, y = batch(seed=t)
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    net2 = copy.deepcopy(net)
    wrong = Calibrated(torch.optim.Adam(net2.parameters(), lr=0.01), every=3, seed=0)
    with pytest.raises(ValueError, match="seed=4"):  # the constructor's settings must match
        wrong.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt2 = Calibrated(torch.optim.Adam(net2.parameters(), lr=0.01), every=3, seed=4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_twins(net, opt, net2, opt2, [batch(seed=t) for t in range(7, 15)])
    assert opt.history == opt2.history


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(every=0), "every"),
        (dict(n=0), "n"),
        (dict(rho=0.0), "rho"),
        (dict(rho=1.5), "rho"),
        (dict(ridge=-1.0), "ridge"),
        (dict(ridge_to="zero"), "ridge_to"),
        (dict(a_range=(2.0, 3.0)), "a_range"),
        (dict(lam_max=-0.1), "lam_max"),
        (dict(beta=1.5), "beta"),
        (dict(probe_update="x"), "probe_update"),
    ],
)
def test_invalid_options(kw, match):
    with pytest.raises(ValueError, match=match):
        Calibrated(torch.optim.SGD(mlp().parameters(), lr=0.1), **kw)


def test_non_learnable_surrogate_is_refused():
    with pytest.raises(ValueError, match="leaky"):
        Calibrated(torch.optim.SGD(mlp("ste").parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no quantized weight"):
        Calibrated(torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1))


def test_leaky_surrogate_granularity_and_identity():
    with pytest.raises(ValueError, match="granularity"):
        mlp(granularity="element")
    s = LeakySurrogate((4, 3), "channel")
    u = torch.linspace(-4, 3, 12).view(4, 3)
    assert torch.equal(s.psi(u, 2, 1), band(u, -2, 1))  # (1, 0): the clipped STE
    s.lam.fill_(1.0)
    assert torch.equal(s.psi(u, 2, 1), torch.ones_like(u))  # (1, 1): the identity STE
