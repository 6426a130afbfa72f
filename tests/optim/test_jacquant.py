"""JacQuant (docs/design.md §8): the two fitted (α, γ) values, b ≡ in is STE + LSQ bitwise, the forward is
unchanged, STORM with a = 1 is the plain step, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _lockstep import assert_lockstep
from torch import nn

import metaste
from metaste.optim.jacquant import JacQuant, fit_slope


def mlp(seed=0, quantizer="lsq", width=128):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, 4))
    return metaste.quantize_model(net, bits=2, quantizer=quantizer)


def batch(seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 128, generator=g), torch.randint(0, 4, (size,), generator=g)


@pytest.mark.parametrize("fit,alpha,gamma", [("probe", 1.0, 0.0), ("dither", 0.25, 1.5)])
def test_fitted_slopes(fit, alpha, gamma):
    # 131 072 in-range elements of an 8-bit grid (edges negligible). Analytically, per φ the best slope is
    # E[Δη|φ]/E[η²]: probe ±½ gives 1; dither U(−½, ½) gives 3φ − 1.5φ², whose line fit on φ ~ U(0, 1)
    # is 0.25 + 1.5φ.
    torch.manual_seed(0)
    u = torch.rand(1, 131072) * 200 - 100
    a, g = fit_slope(u, 128, 127, 131072, fit=fit, ridge=0.0)
    assert float(a) == pytest.approx(alpha, abs=0.02)
    assert float(g) == pytest.approx(gamma, abs=0.03)


def test_slope_in_is_ste_plus_lsq_bitwise(monkeypatch):
    ref, net = mlp(), mlp()
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = JacQuant(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    monkeypatch.setattr(opt, "refit", lambda: None)  # (α, γ) stay (1, 0): b = in
    assert_lockstep(ref, base, net, opt, [batch(seed=t) for t in range(5)])


def test_forward_unchanged_and_slopes_used():
    ref, net = mlp(), mlp()
    opt = JacQuant(torch.optim.SGD(net.parameters(), lr=0.05), every=1)
    x, y = batch()
    assert torch.equal(ref(x), net(x))
    opt.step(lambda: F.cross_entropy(net(x), y))
    assert opt.fits == 1 and not torch.equal(opt.alpha[0], torch.ones_like(opt.alpha[0]))


def test_storm_with_a_one_is_the_plain_step():
    a, b = mlp(), mlp()
    oa = JacQuant(torch.optim.Adam(a.parameters(), lr=0.01), vr="none", every=3)
    ob = JacQuant(torch.optim.Adam(b.parameters(), lr=0.01), vr="storm", storm_a=1.0, every=3)
    for t in range(6):
        x, y = batch(seed=t)
        oa.step(lambda x=x, y=y: F.cross_entropy(a(x), y))
        ob.step(lambda x=x, y=y: F.cross_entropy(b(x), y))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_storm_runs_and_differs():
    a, b = mlp(), mlp()
    oa = JacQuant(torch.optim.SGD(a.parameters(), lr=0.05), vr="none")
    ob = JacQuant(
        torch.optim.SGD(b.parameters(), lr=0.05), vr="storm", storm_a=0.5, flip_rate=1.0
    )  # no phase boundary
    for t in range(4):
        x, y = batch(seed=t)
        oa.step(lambda x=x, y=y: F.cross_entropy(a(x), y))
        ob.step(lambda x=x, y=y: F.cross_entropy(b(x), y))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_storm_refuses_a_closure_that_draws_new_batches():
    net = mlp()
    opt = JacQuant(torch.optim.SGD(net.parameters(), lr=0.05), vr="storm")
    seeds = iter(range(100))

    def closure():
        x, y = batch(seed=next(seeds))
        return F.cross_entropy(net(x), y)

    with pytest.raises(ValueError, match="same batch"):
        opt.step(closure)


def test_group_not_dividing_falls_back_with_warning():
    torch.manual_seed(0)
    net = metaste.quantize_model(nn.Sequential(nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 2)), bits=2)
    with pytest.warns(UserWarning, match="does not divide"):
        opt = JacQuant(torch.optim.SGD(net.parameters(), lr=0.1))
    assert opt.groups == [100]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(group=0), "group"),
        (dict(every=0), "every"),
        (dict(fit="x"), "fit"),
        (dict(eps=0.0), "eps"),
        (dict(b_range=(2.0, 3.0)), "b_range"),
        (dict(ema=1.0), "ema"),
        (dict(vr="adam"), "vr"),
        (dict(storm_a=0.0), "storm_a"),
        (dict(flip_rate=2.0), "flip_rate"),
    ],
)
def test_invalid_options(kw, match):
    with pytest.raises(ValueError, match=match):
        JacQuant(torch.optim.SGD(mlp().parameters(), lr=0.1), **kw)
