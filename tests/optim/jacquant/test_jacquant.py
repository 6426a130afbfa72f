"""JacQuant (docs/design.md §8): the two fitted (α, γ) values, b ≡ in is STE + LSQ bitwise, the forward is
unchanged, STORM with a = 1 is the plain step, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.optim.jacquant.optimizer import JacQuant, fit_slope
from tests.helpers.lockstep import assert_lockstep


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
    monkeypatch.setattr(opt, "refit", lambda us=None: None)  # (α, γ) stay (1, 0): b = in
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


# -- the fit's weights: the layer input's second moment (docs/design.md §8) ---------------------------------


def test_input_moment_linear_is_the_ema_of_the_column_second_moment():
    layer = metaste.quantize_model(nn.Sequential(nn.Linear(6, 3)), bits=2, keep_last=False)[0]
    q = layer.weight_quant
    x1, x2 = torch.randn(5, 6), torch.randn(2, 4, 6)  # any leading dims
    layer(x1)
    assert q.input_moment is None  # off by default: a plain model records nothing
    q.input_moment_ema = 0.75
    layer(x1)
    q.fold_input_moment()  # once per optimizer step
    assert torch.allclose(q.input_moment, (x1**2).mean(0))
    layer(x2)
    q.fold_input_moment()
    expected = 0.75 * (x1**2).mean(0) + 0.25 * (x2.reshape(-1, 6) ** 2).mean(0)
    assert torch.allclose(q.input_moment, expected)
    layer.eval()
    layer(10 * x1)  # eval forwards do not record
    q.fold_input_moment()
    assert torch.allclose(q.input_moment, expected)
    layer.train()
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    layer(a)
    layer(b)  # two micro-batches of one step: the EMA moves once, by their mean
    q.fold_input_moment()
    expected = 0.75 * expected + 0.25 * ((a**2).mean(0) + (b**2).mean(0)) / 2
    assert torch.allclose(q.input_moment, expected)


@pytest.mark.parametrize("groups", [1, 2])
def test_input_moment_conv_repeats_the_channel_moment_over_the_kernel(groups):
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=groups))
    layer = metaste.quantize_model(net, bits=2, keep_last=False)[0]
    layer.weight_quant.input_moment_ema = 0.0
    x = torch.randn(2, 4, 5, 5)
    layer(x)
    layer.weight_quant.fold_input_moment()
    per_channel = [float((x[:, c] ** 2).mean()) for c in range(4)]
    cpg = 4 // groups
    rows = []
    for o in range(6):
        grp = o // (6 // groups)
        rows.append([per_channel[grp * cpg + j // 9] for j in range(cpg * 9)])  # column j = (channel, kh, kw)
    expected = torch.tensor(rows)
    got = layer.weight_quant.input_moment
    assert got.shape == ((cpg * 9,) if groups == 1 else (6, cpg * 9))
    assert torch.allclose(got.expand(6, cpg * 9), expected)


@pytest.mark.parametrize("fit", ["dither", "probe"])
def test_fit_ignores_columns_of_weight_zero(fit):
    torch.manual_seed(0)
    u = torch.rand(1, 512) * 3 - 1.5  # a 2-bit grid: some elements clipped
    w = torch.cat([torch.rand(256) + 0.5, torch.zeros(256)])
    a, g = fit_slope(u, 2, 1, 512, fit=fit, weight=w, seed=3)
    other = u.clone()
    other[:, 256:] = torch.rand(1, 256) * 40 - 20  # whatever the ignored columns hold
    assert fit_slope(other, 2, 1, 512, fit=fit, weight=w, seed=3) == (a, g)
    # the fit on the kept columns only: the same perturbations η (a row's draws are a prefix)
    a_kept, g_kept = fit_slope(u[:, :256], 2, 1, 256, fit=fit, weight=w[:256], seed=3)
    assert float(a) == pytest.approx(float(a_kept), rel=1e-12)
    assert float(g) == pytest.approx(float(g_kept), rel=1e-12)
    a_all, _ = fit_slope(u, 2, 1, 512, fit=fit, seed=3)  # unweighted: the other columns count
    assert float(a_all) != pytest.approx(float(a), rel=1e-3)


def test_wrapper_fits_with_the_recorded_input_moment(monkeypatch):
    import metaste.optim.jacquant.optimizer as jq

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    net = metaste.quantize_model(net, bits=2, quantizer="lsq", keep_last=False)
    opt = JacQuant(torch.optim.SGD(net.parameters(), lr=0.05), every=1)
    seen = []

    def spy(u, *args, weight=None, **kw):
        seen.append(None if weight is None else weight.clone())
        return fit_slope(u, *args, weight=weight, **kw)

    monkeypatch.setattr(jq, "fit_slope", spy)
    x, y = batch()
    net.eval()  # an eval forward records nothing
    hidden = torch.relu(net[0](x))  # the second layer's input at the step's weights
    net.train()
    opt.step(lambda: F.cross_entropy(net(x), y))
    assert len(seen) == 2
    assert torch.allclose(seen[0], (x**2).mean(0))  # the first step's fit sees that step's batch
    assert torch.allclose(seen[1], (hidden**2).mean(0))
    x2, y2 = batch(seed=2)
    opt.step(lambda: F.cross_entropy(net(x2), y2))
    assert torch.allclose(seen[2], 0.9 * (x**2).mean(0) + 0.1 * (x2**2).mean(0))  # the wrapper's ema
    opt.close()
    net(x2)
    assert all(m.weight_quant.input_moment is None for m in (net[0], net[2]))


def test_weighted_fit_changes_the_slopes():
    # inputs whose first half of columns are 0: a weighted fit uses only the second half's elements
    def run(weighted):
        net = mlp()
        opt = JacQuant(torch.optim.SGD(net.parameters(), lr=0.05), every=1)
        if not weighted:
            for e in opt.managed:
                e.quantizer.input_moment_ema = None
        x, y = batch()
        x[:, :64] = 0
        opt.step(lambda: F.cross_entropy(net(x), y))
        return opt.alpha[0]

    assert not torch.allclose(run(True), run(False))


@pytest.mark.parametrize("fit", ["dither", "probe"])
def test_a_conv_weight_is_fitted_as_its_flattened_matrix(fit):
    """(out, in, kh, kw) is fitted as (out, in·kh·kw), element for element (the draws too)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 2, 3, 3, generator=g) * 1.5
    weight = torch.rand(2 * 3 * 3, generator=g)
    conv = fit_slope(u, 2, 1, 9, fit=fit, weight=weight, seed=3)
    flat = fit_slope(u.reshape(4, -1), 2, 1, 9, fit=fit, weight=weight, seed=3)
    for a, b in zip(conv, flat):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
