"""HyperSTE(method="delayed") and the diffopt machinery (docs/design.md §3.2, §3.5)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import metaste
from metaste import HyperSTE
from tests.helpers.hyperste import (
    OPTIMIZERS,
    WARMUP,
    batches,
    clone_run,
    loss_fn,
    quantized_mlp,
    set_surrogate_params,
    warmed_up_smooth_model,
)


def _smooth_setup(name):
    cls, kw = OPTIMIZERS[name]
    data = [(x.double(), y) for x, y in batches(WARMUP + 2, size=16)]
    data = [
        (torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64), y)
        for i, (_, y) in enumerate(data)
    ]
    return warmed_up_smooth_model(cls, kw, data)


def _delayed_hypergradient(model, opt, pair):
    m, o = clone_run(model, opt)
    h_opt = HyperSTE(o, method="delayed", hyper_lr=1.0, hyper_lr_mode="raw", boundary="none")
    for x, y in pair:
        h_opt.step(lambda x=x, y=y: loss_fn(m, x, y))
    return h_opt.method.hypergrad[0]


def _loss_after_perturbed_step(model, opt, pair, theta):
    """L_{t+1} where only step t's backward uses ``theta`` (the forward keeps its a)."""
    m, o = clone_run(model, opt)
    q = m[0].weight_quant
    (x0, y0), (x1, y1) = pair
    with torch.no_grad():
        q.surrogate.a.copy_(theta)
    o.zero_grad()
    loss_fn(m, x0, y0).backward()
    o.step()
    with torch.no_grad():
        return float(loss_fn(m, x1, y1))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_delayed_hypergradient_matches_central_finite_differences(name):
    model, opt, pair = _smooth_setup(name)
    h = _delayed_hypergradient(model, opt, pair)
    theta = model[0].weight_quant.surrogate.a.clone()
    assert h.abs().max() > 0
    g = torch.Generator().manual_seed(7)
    eps = 1e-6
    for _ in range(2):
        d = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        lp = _loss_after_perturbed_step(model, opt, pair, theta + eps * d)
        lm = _loss_after_perturbed_step(model, opt, pair, theta - eps * d)
        fd = (lp - lm) / (2 * eps)
        assert float((h * d).sum()) == pytest.approx(fd, rel=1e-4, abs=1e-10)


def test_delayed_hypergradient_matches_higher_unrolled_sgd():
    higher = pytest.importorskip("higher")
    model, opt, pair = _smooth_setup("sgd")
    h = _delayed_hypergradient(model, opt, pair)
    m, o = clone_run(model, opt)
    theta = m[0].weight_quant.surrogate.a.clone().requires_grad_()
    (x0, y0), (x1, y1) = pair
    with higher.innerloop_ctx(m, o, copy_initial_weights=True) as (fm, dopt):
        # the backward's ψ(u; θ) now carries a graph to θ (higher differentiates with create_graph)
        fm[0].weight_quant.surrogate.a = theta
        dopt.step(loss_fn(fm, x0, y0))
        (h_ref,) = torch.autograd.grad(loss_fn(fm, x1, y1), theta)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-14)


def test_delayed_equals_analytical_identity_on_unique_scaling_elements():
    """docs/design.md §3.5: k = 2, SGD, the same boundary mode. Delayed's h = −c·ψ(u; a); with x = η_a·c,
    delayed moves a by a·x and analytical by a·x/(1 − x), exactly (not to O(η_a²))."""
    ETA = 3000.0  # raw η_a: c ≈ 1e-5 here, so x = η_a·c reaches 0.1 and more
    base = quantized_mlp(dtype=torch.float64, quantizer="fixed")
    set_surrogate_params(base, 0.7, 1.3)
    data = batches(2, size=64, dtype=torch.float64)
    runs = {}
    for method in ("analytical", "delayed"):
        m = copy.deepcopy(base)
        opt = HyperSTE(
            torch.optim.SGD(m.parameters(), lr=0.5),
            method=method,
            hyper_lr=ETA,
            hyper_lr_mode="raw",
            boundary="window",
            model=m,
        )
        hist = []
        for x, y in data:
            u = [e.u() for _, e in metaste.quantized_weights(m)]
            opt.step(lambda x=x, y=y, m=m: loss_fn(m, x, y))
            hist.append((u, copy.deepcopy(opt.state_dict()["metaste"]["method"])))
        runs[method] = (m, opt, hist)
    a0 = [t for _, t in metaste.surrogate_parameters(base)]
    _, an_opt, an_hist = runs["analytical"]
    entries = [e for _, e in metaste.quantized_weights(base)]
    for i, e in enumerate(entries):
        h0, h1 = an_hist[0][1]["history"][i], an_hist[1][1]["history"][i]
        c = h0["lr"] * h1["g"] * h0["g"] * h0["d"]
        u1 = an_hist[1][0][i]
        h = runs["delayed"][1].method.hypergrad[i]
        psi = e.surrogate.psi(u1, e.qn, e.qp, [a0[i]])
        torch.testing.assert_close(h, -c * psi, rtol=1e-12, atol=1e-300)  # docs/design.md §3.5, to rounding
        x = ETA * c
        a = a0[i]
        r = torch.where(
            u1 > 0, 1 - a * u1 / e.qp, torch.where(u1 < 0, 1 + a * u1 / e.qn, torch.ones_like(u1))
        )
        scaling = (r > 0) & (x < r)
        assert scaling.float().mean() > 0.5 and (x[scaling].abs() > 0.1).any()
        a_d = runs["delayed"][0].get_buffer(f"{_layer(base, e)}.weight_quant.surrogate.a")
        a_an = runs["analytical"][0].get_buffer(f"{_layer(base, e)}.weight_quant.surrogate.a")
        torch.testing.assert_close((a_d - a)[scaling], (a * x)[scaling], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close((a_an - a)[scaling], (a * x / (1 - x))[scaling], rtol=1e-9, atol=1e-15)


def _layer(model, entry):
    return next(
        n for n, mod in model.named_modules() if getattr(mod, "weight_quant", None) is entry.quantizer
    )


@pytest.mark.parametrize("accumulate", ["first", "sum", "mean"])
def test_delayed_updates_only_at_window_ends_and_stays_clamped(accumulate):
    model = quantized_mlp(surrogate="plste", granularity="channel")
    opt = HyperSTE(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        method="delayed",
        hyper_lr=0.5,
        window=3,
        accumulate=accumulate,
    )
    prev = [t.clone() for _, t in metaste.surrogate_parameters(model)]
    for t, (x, y) in enumerate(batches(9)):
        opt.step(lambda x=x, y=y: loss_fn(model, x, y))
        now = [p.clone() for _, p in metaste.surrogate_parameters(model)]
        changed = any(not torch.equal(a, b) for a, b in zip(prev, now))
        assert changed == (t % 3 == 2)
        for s in (e.surrogate for _, e in metaste.quantized_weights(model)):
            assert bool((s.a >= s.a_min).all() and (s.a <= s.a_max).all())
        prev = now
    d = opt.diagnostics
    assert d["hypergrad_norm"] > 0 and d["skipped_windows"] == 0
    assert {"mean", "q50", "frac_at_min", "frac_at_max", "hist", "clipped_frac"} <= set(
        next(iter(d["layers"].values()))
    )


def test_delayed_with_a_hyper_optimizer_and_dlste():
    model = quantized_mlp(surrogate="dlste", granularity="tensor")
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="delayed",
        hyper_lr=0.05,
        hyper_optimizer=torch.optim.Adam,
        hyper_optimizer_kwargs={"betas": (0.8, 0.9)},
    )
    for x, y in batches(4):
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    a = [t for _, t in metaste.surrogate_parameters(model)]
    assert all(not torch.equal(t, torch.ones_like(t)) for t in a)
    assert opt.state_dict()["metaste"]["method"]["hyper_opt"]["state"]
    # Adam's first step moves each a by lr·m̂/(√v̂ + eps) = lr·h/(|h| + eps) ≈ −hyper_lr·sign(h): after
    # the first window (steps 0, 1) every scalar a_n, a_p with a nonzero hypergradient sits at 1 ∓ 0.05
    model = quantized_mlp(surrogate="dlste", granularity="tensor")
    opt = HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1), method="delayed", hyper_lr=0.05, hyper_optimizer="adam"
    )
    for x, y in batches(2):
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    moved = 0
    for (_, t), h in zip(metaste.surrogate_parameters(model), opt.method.hypergrad):
        expected = torch.where(h == 0, 1.0, 1.0 - 0.05 * torch.sign(h))
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
        moved += int((h != 0).sum())
    assert moved >= 2


class _Plain(torch.optim.Optimizer):
    """A third-party optimizer without torch.optim's differentiable mode."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


def test_optimizer_without_differentiable_mode_falls_back_to_sgd_with_a_warning():
    """The fallback treats the update as v − lr·g: for an optimizer that IS plain SGD it gives
    exactly SGD's hypergradients and trajectory."""
    runs = []
    for cls in (_Plain, torch.optim.SGD):
        model = quantized_mlp(surrogate="plste")
        opt = HyperSTE(cls(model.parameters(), lr=0.1), method="delayed", hyper_lr=0.1)
        with (
            pytest.warns(UserWarning, match="no differentiable=True mode") if cls is _Plain else nullcontext()
        ):
            for x, y in batches(4):
                opt.step(lambda x=x, y=y, m=model: loss_fn(m, x, y))
        assert opt.diagnostics["hypergrad_norm"] > 0
        runs.append((model.state_dict(), opt.method.hypergrad))
    (sd_plain, h_plain), (sd_sgd, h_sgd) = runs
    for k in sd_sgd:
        assert torch.equal(sd_plain[k], sd_sgd[k]), k
    for a, b in zip(h_plain, h_sgd):
        assert torch.equal(a, b)


@pytest.mark.parametrize("window", [2, 3])
def test_last_hypergradient_is_released_before_the_step_that_replaces_it(window):
    """``method.hypergrad`` (a diagnostic) holds the last applied h between steps and is
    released when the window's last step starts, before its backward pass (the peak): never two at once.
    It is empty until the first window ends, and checkpoints do not hold it."""
    model = quantized_mlp(surrogate="slste", seed=0)
    opt = HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), method="delayed", window=window, hyper_lr=0.1)
    seen = []
    data = batches(3 * window, size=16)
    for t, (x, y) in enumerate(data):

        def closure(x=x, y=y):
            seen.append([h.clone() for h in opt.method.hypergrad])
            return loss_fn(model, x, y)

        before = [h.clone() for h in opt.method.hypergrad]
        opt.step(closure)
        last = t % window == window - 1
        assert (seen[-1] == []) == (last or t < window)  # released inside the last step only
        if last:  # replaced by this window's h, which moved θ
            assert len(opt.method.hypergrad) == len(opt.method.tensors) and opt.method.hypergrad_norm > 0
            assert not any(torch.equal(a, b) for a, b in zip(opt.method.hypergrad, before))
        else:  # visible unchanged between the other steps
            assert all(torch.equal(a, b) for a, b in zip(opt.method.hypergrad, before))
            assert len(opt.method.hypergrad) == len(before)
    assert "hypergrad" not in opt.state_dict()["metaste"]["method"]
