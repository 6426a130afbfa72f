"""PEGE (docs/design.md §7): curriculum, M ≡ 1 after T_r, δ = λ = 0 is the STE/LSQ step bitwise, λ = 0 is
EWGS, the penalty alone lowers Σe² without changing codes, mask fractions, validation, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste import PEGE
from metaste.optim.pege.optimizer import replace_ratio
from tests.helpers.lockstep import assert_lockstep, assert_twins


def mlp(seed=0, quantizer="fixed", act_bits=None, width=16):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4)
    )
    return metaste.quantize_model(net, bits=2, quantizer=quantizer, act_bits=act_bits)


def batch(seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=g), torch.randint(0, 4, (size,), generator=g)


def test_curriculum():
    for t in (0, 10, 37, 50, 99):
        tau = min(t / 50, 1.0)
        assert replace_ratio(t, 50, 9.0) == pytest.approx(math.log(1 + 9 * tau) / math.log(10))
        assert replace_ratio(t, 50, 0.0) == pytest.approx(tau)
    assert replace_ratio(50, 50, 9.0) == 1.0
    assert replace_ratio(10, 50, 9.0) > replace_ratio(10, 50, 0.0)  # log: fast start


def test_full_precision_at_start_and_quantized_after_replace_steps():
    net = mlp()
    layer = net[0]
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=0.1), replace_steps=10)
    assert torch.equal(layer.quantized_weight(), layer.weight)  # r(0) = 0: M ≡ 0
    opt.steps = 10
    s = layer.weight_quant.s
    c = torch.clamp(torch.round(layer.weight.detach() / s), -2, 1)
    assert torch.equal(layer.quantized_weight(), c * s)  # t ≥ T_r: M ≡ 1, w̃ = s·c bitwise
    opt.steps = 3
    net.eval()
    assert torch.equal(layer.quantized_weight(), c * s)  # eval: M ≡ 1


@pytest.mark.parametrize("quantizer,act_bits", [("fixed", None), ("lsq", None), ("lsq", 2)])
def test_delta_lambda_zero_is_plain_ste_bitwise(quantizer, act_bits):
    ref, net = mlp(quantizer=quantizer, act_bits=act_bits), mlp(quantizer=quantizer, act_bits=act_bits)
    base = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = PEGE(
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        replace_steps=1,
        delta=0.0,
        lam=0.0,
        model=net,
    )
    opt.steps = 1
    assert_lockstep(ref, base, net, opt, [batch(seed=t) for t in range(6)])


def _single_layer():
    torch.manual_seed(0)
    return metaste.quantize_model(
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)), bits=2, quantizer="fixed"
    )


def test_lambda_zero_is_ewgs():
    net = _single_layer()
    delta = 0.05
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=0.0), replace_steps=1, delta=delta, lam=0.0)
    opt.steps = 1
    x, y = batch()
    opt.step(lambda: F.cross_entropy(net(x), y))
    layer = net[0]
    s = layer.weight_quant.s
    u = layer.weight.detach() / s
    c = torch.clamp(torch.round(u), -2, 1)
    vhat = (c * s).requires_grad_()
    loss = F.cross_entropy(net[2](torch.tanh(F.linear(x, vhat, layer.bias))), y)
    (g,) = torch.autograd.grad(loss, vhat)
    inside = ((u >= -2) & (u <= 1)).float()
    expected = inside * g * (1 + delta * torch.sign(g) * (u - c))
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(layer.weight.grad, inside * g, rtol=1e-4, atol=0)  # δ matters


def test_penalty_alone_lowers_error_without_changing_codes():
    net = _single_layer()
    lam = 1.0
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=1e-3), replace_steps=1, delta=0.0, lam=lam)
    opt.steps = 1
    layer = net[0]
    s = layer.weight_quant.s
    v0 = layer.weight.detach().clone()
    u0 = v0 / s
    c0 = torch.clamp(torch.round(u0), -2, 1)
    x, y = batch()
    opt.step(lambda: 0.0 * F.cross_entropy(net(x), y))  # the task loss contributes nothing
    # its gradient: λ·2e/(n·s), with c and s detached
    torch.testing.assert_close(
        layer.weight.grad, lam * 2 * (u0 - c0) / (v0.numel() * s), rtol=1e-6, atol=1e-12
    )
    u1 = layer.weight.detach() / s
    assert float(((u1 - c0) ** 2).sum()) < float(((u0 - c0) ** 2).sum())
    assert torch.equal(torch.clamp(torch.round(u1), -2, 1), c0)


@pytest.mark.parametrize("select", ["random", "error"])
def test_mask_fraction(select):
    torch.manual_seed(0)
    net = metaste.quantize_model(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)), bits=2)
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=0.1), replace_steps=100, select=select, lam=1.0)
    site = opt.sites[0]
    for t in (5, 20, 60):
        opt.steps = t
        net[0].quantized_weight()
        mask = site.record[2]
        r, n = opt.ratio(), mask.numel()
        if select == "random":
            assert abs(float(mask.mean()) - r) < 4 * math.sqrt(r * (1 - r) / n)
        else:
            assert int(mask.sum()) == math.ceil(r * n)
            w, q = net[0].weight.detach(), net[0].weight_quant
            u = w / q.scale(w)
            e = (u - torch.clamp(torch.round(u), -q.qn, q.qp)).abs()
            assert float(e[mask.bool()].max()) <= float(e[~mask.bool()].min())


def test_random_masks_redrawn_each_forward_and_seeded():
    net = mlp()
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=0.1), replace_steps=10, lam=1.0, seed=3)
    opt.steps = 4
    net[0].quantized_weight()
    m1 = opt.sites[0].record[2].clone()
    net[0].quantized_weight()
    assert not torch.equal(m1, opt.sites[0].record[2])
    opt.sites[0].calls = 0
    net[0].quantized_weight()
    assert torch.equal(m1, opt.sites[0].record[2])


def test_checkpoint_resumes_identical_trajectory():
    net = mlp(quantizer="lsq")
    opt = PEGE(torch.optim.Adam(net.parameters(), lr=0.01), total_steps=20, seed=2)
    for t in range(5):
        x, y = batch(seed=t)
        opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y))
    net2 = mlp(quantizer="lsq", seed=9)  # not a deepcopy: that would copy opt's forward hooks too
    net2.load_state_dict(net.state_dict())
    wrong = PEGE(torch.optim.Adam(net2.parameters(), lr=0.01), total_steps=20)
    with pytest.raises(ValueError, match="seed=2"):  # the constructor's settings must match
        wrong.load_state_dict(copy.deepcopy(opt.state_dict()))
    wrong.remove()  # its forward hooks would mix into net2's passes
    opt2 = PEGE(torch.optim.Adam(net2.parameters(), lr=0.01), total_steps=20, seed=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert_twins(net, opt, net2, opt2, [batch(seed=t) for t in range(5, 12)])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(replace_steps=0), "T_r"),
        (dict(replace_steps=-5), "T_r"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10, k=-1.0), "k"),
        (dict(total_steps=10, select="big"), "select"),
        (dict(total_steps=10, delta=-1.0), "delta"),
        (dict(total_steps=10, lam=math.nan), "lam"),
        (dict(), "total_steps"),
    ],
)
def test_invalid_options(kw, match):
    with pytest.raises(ValueError, match=match):
        PEGE(torch.optim.SGD(mlp().parameters(), lr=0.1), **kw)


def test_needs_quantized_weights_and_can_be_removed():
    with pytest.raises(ValueError, match="no quantized weight"):
        PEGE(torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1), total_steps=10)
    net = mlp()
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=0.1), total_steps=10)
    opt.remove()
    assert not torch.equal(net[0].quantized_weight(), net[0].weight)  # the plain quantizer again


def test_activation_penalty_gradient_equals_autograd_of_the_penalized_loss():
    """The activation penalty's gradient, added in the mix's backward, equals autograd of
    loss + λ·Σ mean((x/s − c)²) over the activation quantizers (c, s held); past T_r, δ = 0."""
    lam = 0.5
    net, ref = mlp(act_bits=2), mlp(act_bits=2)
    x, y = batch()
    net(x), ref(x)  # the activation quantizers set their steps from a first batch
    opt = PEGE(torch.optim.SGD(net.parameters(), lr=0.1), replace_steps=1, delta=0.0, lam=lam, model=net)
    opt.steps = 1
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    weight_sites = [s for s in opt.sites if s.kind == "weight"]
    opt._add_penalty_grads()
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    inputs = []
    acts = [m for m in ref.modules() if isinstance(m, metaste.quant.ActivationLSQQuantizer)]
    handles = [m.register_forward_hook(lambda mod, a, out: inputs.append((mod, a[0]))) for m in acts]
    loss = F.cross_entropy(ref(x), y)
    for h in handles:
        h.remove()
    for mod, a in inputs:
        s = mod.s.detach().clamp(min=1e-8)
        c = torch.round(a.detach() / s).clamp(-mod.qn, mod.qp)
        loss = loss + lam * ((a / s - c) ** 2).mean()
    weights = [m for m in ref.modules() if isinstance(m, metaste.QuantLinear)]
    for w in weights:  # the weight penalty, from the hand formula
        q = w.weight_quant
        s = q.scale(w.weight.detach())
        c = torch.round(w.weight / s).clamp(-q.qn, q.qp).detach()
        loss = loss + lam * ((w.weight / s - c) ** 2).mean()
    loss.backward()
    assert len(weight_sites) == len(weights) and inputs
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
