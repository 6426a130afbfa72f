"""metaste.optim.hyper.diffopt (docs/design.md §3.2): the differentiable update equals the real one,
is differentiable in v_t and the optimizer state, and the one-step hypergradient matches central
finite differences of ⟨λ, v_{t+1}(θ)⟩ — the function delayed and fagu share."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import metaste
from metaste.optim.hyper.diffopt import (
    differentiable_step,
    differentiable_update,
    one_step_hypergradient,
    record_update,
)
from metaste.quant.learnable import psi_differentiable
from tests.helpers.hyperste import batches, loss_fn, quantized_mlp, set_surrogate_params


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
        (torch.optim.AdamW, dict(lr=1e-2)),
        (torch.optim.NAdam, dict(lr=1e-2)),
        (torch.optim.RAdam, dict(lr=1e-2)),
        (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5)),
        (torch.optim.Adagrad, dict(lr=1e-2)),
        (torch.optim.Adamax, dict(lr=1e-2)),
        (torch.optim.Adadelta, dict(lr=1.0)),
    ],
)
def test_differentiable_update_equals_the_real_update_and_has_finite_hypergradient(cls, kw):
    """The clone's v_{t+1} equals the real optimizer's, on the first step (SGD buffer repair) and a
    later one, and ⟨λ, ∂v/∂θ⟩ is finite although some gradient elements are exactly zero."""
    model = quantized_mlp(dtype=torch.float64)
    set_surrogate_params(model, 0.5, 1.5)
    opt = cls(model.parameters(), **kw)
    entries = [e for _, e in metaste.quantized_weights(model)]
    params = [e.weight for e in entries]
    for e in entries:
        e.quantizer.defer_surrogate = True  # p.grad = raw ∂L/∂v̂; ψ applied below
    for x, y in batches(2, size=16, dtype=torch.float64):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        raw = [p.grad for p in params]
        thetas = [e.surrogate.a.clone().requires_grad_() for e in entries]
        grads = [
            g * psi_differentiable(e.surrogate, e.u(), e.qn, e.qp, [t])
            for g, e, t in zip(raw, entries, thetas)
        ]
        assert any(bool((g == 0).any()) for g in grads)  # clipped elements: exact zeros
        rec = record_update(opt, params)
        v_next = differentiable_update(rec, grads)
        for p, g in zip(params, grads):
            p.grad = g.detach()
        opt.step()
        for v, p, v0 in zip(v_next, params, rec.params):
            # torch's differentiable Adam family computes the bias correction from the float32
            # step tensor: the update agrees to float32 rounding, not float64
            torch.testing.assert_close(v.detach() - v0, p.detach() - v0, rtol=1e-4, atol=1e-12)
        lam = [torch.randn_like(p) for p in params]
        hs = torch.autograd.grad(v_next, thetas, grad_outputs=lam, allow_unused=True)
        assert all(h is None or bool(torch.isfinite(h).all()) for h in hs)


def test_differentiable_step_is_differentiable_in_params_and_state():
    """Adam: the clone's (v_{t+1}, m, v) equal the real step, and ∂⟨λ, v_{t+1}⟩/∂(v_t, m_t)
    matches central finite differences of the real update."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.randn(5, dtype=torch.float64)
        opt.step()
    grad = torch.randn(5, dtype=torch.float64)
    rec = record_update(opt, [p])
    v = p.detach().clone().requires_grad_()
    m = opt.state[p]["exp_avg"].detach().clone().requires_grad_()
    st = {**opt.state[p], "exp_avg": m}
    (v1,), (s1,) = differentiable_step(rec, [grad], params=[v], states=[st])
    p.grad = grad
    opt.step()
    torch.testing.assert_close(v1.detach(), p.detach(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(s1["exp_avg"].detach(), opt.state[p]["exp_avg"])
    lam = torch.randn(5, dtype=torch.float64)
    gv, gm = torch.autograd.grad(v1, [v, m], lam)

    def real(v0, m0):
        q = nn.Parameter(v0.clone())
        o = torch.optim.Adam([q], lr=0.1)
        o.load_state_dict(
            {"state": {0: {**{k: x.clone() for k, x in rec.states[0].items()}, "exp_avg": m0.clone()}},
             "param_groups": [{**rec.groups[0], "params": [0]}]}
        )  # fmt: skip
        q.grad = grad.clone()
        o.step()
        return float((q.detach() * lam).sum())

    d, eps = torch.randn(5, dtype=torch.float64), 1e-6
    v0, m0 = rec.params[0], rec.states[0]["exp_avg"]
    fd_v = (real(v0 + eps * d, m0) - real(v0 - eps * d, m0)) / (2 * eps)
    fd_m = (real(v0, m0 + eps * d) - real(v0, m0 - eps * d)) / (2 * eps)
    assert float((gv * d).sum()) == pytest.approx(fd_v, rel=1e-5)
    assert float((gm * d).sum()) == pytest.approx(fd_m, rel=1e-4)
    assert math.isfinite(fd_m)


def _before_an_update(surrogate, granularity, cls, kw):
    """A float64 quantized MLP whose optimizer ``cls(**kw)`` has taken two steps (so momentum /
    Adam state exist) and whose raw gradients ∂L/∂v̂ of a third are in: (entries, opt, the raw
    gradients, the u, the θ values)."""
    model = quantized_mlp(surrogate=surrogate, granularity=granularity, dtype=torch.float64)
    set_surrogate_params(model, 0.7, 1.3)
    entries = [e for _, e in metaste.quantized_weights(model)]
    for e in entries:
        e.quantizer.defer_surrogate = True  # p.grad = raw ∂L/∂v̂
    opt = cls(model.parameters(), **kw)
    x, y = batches(1, size=16, dtype=torch.float64)[0]
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    raw = [e.weight.grad.clone() for e in entries]
    us = [e.u() for e in entries]
    thetas = [[t.detach().clone() for t in e.surrogate.params()] for e in entries]
    return entries, opt, raw, us, thetas


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (torch.optim.Adam, dict(lr=1e-2)),
    ],
)
@pytest.mark.parametrize("surrogate", ["plste", "dlste"])
def test_one_step_hypergradient_matches_finite_differences_of_the_real_update(cls, kw, surrogate):
    """h = ⟨λ, ∂v_{t+1}/∂θ⟩ against a central difference of ⟨λ, v_{t+1}(θ ± δ·d)⟩, where v_{t+1} is the
    REAL optimizer's step on g ⊙ ψ(u; θ ± δ·d) (PLSTE/DLSTE: ψ is smooth in θ inside the band)."""
    entries, opt, raw, us, thetas = _before_an_update(surrogate, "tensor", cls, kw)
    params = [e.weight for e in entries]
    rec = record_update(opt, params)
    gen = torch.Generator().manual_seed(0)
    lams = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    hs = one_step_hypergradient(rec, entries, raw, us, thetas, lams)

    def real(k, j, delta):
        """⟨λ, v_{t+1}⟩ after the real optimizer's step with θ_kj shifted by delta."""
        o = cls([nn.Parameter(v.clone()) for v in rec.params], **kw)
        for q, st in zip(o.param_groups[0]["params"], rec.states):
            if st:
                o.state[q] = {n: v.clone() for n, v in st.items()}
        for n, (q, e, g, u, th) in enumerate(zip(o.param_groups[0]["params"], entries, raw, us, thetas)):
            th = [t + delta if (n, i) == (k, j) else t for i, t in enumerate(th)]
            q.grad = g * psi_differentiable(e.surrogate, u, e.qn, e.qp, th).detach()
        o.step()
        return sum(float((q.detach() * lam).sum()) for q, lam in zip(o.param_groups[0]["params"], lams))

    checked = 0
    for k, hk in enumerate(hs):
        for j, h in enumerate(hk):
            fd = (real(k, j, 1e-6) - real(k, j, -1e-6)) / 2e-6
            assert float(h.sum()) == pytest.approx(fd, rel=1e-4, abs=1e-10)
            checked += abs(fd) > 0
    assert checked >= 2
    # a weight without λ_{t+1} gets no hypergradient
    none = one_step_hypergradient(rec, entries, raw, us, thetas, [None] + lams[1:])
    assert all(h is None for h in none[0]) and torch.equal(none[1][0], hs[1][0])


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.SGD, dict(lr=0.1)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
        (torch.optim.Adam, dict(lr=1e-2)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    ],
)
def test_light_records_give_the_hypergradient_of_the_differentiable_replay(cls, kw):
    """the closed forms behind record_update(light=True) — SGD from its hyperparameters, Adam /
    AdamW from the state after the update — equal the differentiable replay of a full record."""
    entries, opt, raw, us, thetas = _before_an_update("plste", "channel", cls, kw)
    params = [e.weight for e in entries]
    for e, g, u, th in zip(entries, raw, us, thetas):  # the step uses g ⊙ ψ, as HyperSTE's does
        e.weight.grad = g * e.surrogate.psi(u, e.qn, e.qp, th)
    full, light = record_update(opt, params), record_update(opt, params, light=True)
    assert light.params == []
    opt.step()
    gen = torch.Generator().manual_seed(0)
    lams = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    live = [opt.state[p] for p in params]
    h_full = one_step_hypergradient(full, entries, raw, us, thetas, lams)
    h_light = one_step_hypergradient(light, entries, raw, us, thetas, lams, live_states=live)
    for a, b in zip(h_full, h_light):
        for x_full, x_light in zip(a, b):
            assert x_full.abs().max() > 0
            torch.testing.assert_close(x_light, x_full, rtol=1e-9, atol=1e-15)
