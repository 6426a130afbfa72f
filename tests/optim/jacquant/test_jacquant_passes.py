"""JacQuant's compiled passes give the bits of their eager twins and the hand formulas, and a
JacQuant run with them is the eager run bit for bit."""

import warnings

import pytest
import torch

import metaste
from metaste import _compile
from metaste.optim.jacquant import passes
from tests.helpers.compiled import eager_and_compiled, eager_and_compiled_runs

pytestmark = pytest.mark.compiled


def _both(fn, *args):
    """fn(*args) eager, then compiled: (output, the argument copies it wrote into) of each."""
    return eager_and_compiled(passes, fn, *args)


def _case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(12, 3, 16, generator=g, dtype=dtype) * 2  # (out, groups, G)
    u[0, 0, :4] = torch.tensor([0.5, -0.5, 1.0, -2.0], dtype=dtype)  # ties of round, band edges
    gamma = torch.randn(12, 3, 1, generator=g) * 2
    alpha = torch.rand(12, 3, 1, generator=g) + 0.5
    grad = torch.randn(u.shape, generator=g, dtype=dtype)
    return u, gamma, alpha, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slopes_compiled_give_the_eager_bits_and_the_formula(dtype):
    u, gamma, alpha, _ = _case(dtype)
    (eager, _), (fused, _) = _both(passes.slopes, u, gamma, alpha, 2, 1, (0.0, 4.0))
    assert all(torch.equal(a, b) for a, b in zip(eager, fused))
    b, inside, c = eager
    phi = metaste.optim.jacquant.slope_phi(u)
    want_in = ((u >= -2) & (u <= 1)).to(dtype)
    assert torch.equal(inside, want_in) and torch.equal(c, torch.round(u.clamp(-2, 1)))
    want_b = (alpha.to(dtype) + gamma.to(dtype) * phi).clamp(0.0, 4.0) * want_in
    torch.testing.assert_close(b, want_b, rtol=1e-6, atol=1e-6)  # the hand formula, γ·φ vs 2γ·|u − c|


@pytest.mark.parametrize("correct_s,with_last", [(True, True), (False, False)])
def test_step_slopes_compiled_give_the_eager_bits_and_the_formula(correct_s, with_last):
    u, gamma, alpha, grad = _case()
    last = torch.round(u.clamp(-2, 1)).to(torch.int8)
    last[0, 0, 0] += 1  # one flipped code
    last = last if with_last else None
    (out_e, args_e), (out_f, args_f) = _both(
        passes.step_slopes, u, gamma, alpha, 2, 1, (0.0, 4.0), grad, correct_s, torch.int8, last
    )
    for a, b in zip(out_e, out_f):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(args_e[6], args_f[6])  # the gradient, scaled in place
    codes, flips, corr = out_e
    b, inside, c = passes.slopes(u, gamma, alpha, 2, 1, (0.0, 4.0))
    assert torch.equal(codes, c.to(torch.int8)) and torch.equal(args_e[6], grad * b)
    assert (flips is None) == (last is None) and (last is None or int(flips) == 1)
    assert (corr is None) == (not correct_s)
    if correct_s:
        assert torch.equal(corr, grad * u * (inside - b))


def _jacquant(model, vr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metaste.JacQuant(torch.optim.SGD(model.parameters(), lr=0.1), vr=vr, every=3, flip_rate=1.0)


@pytest.mark.parametrize("vr,quantizer", [("none", "lsq"), ("storm", "lsq"), ("none", "fixed")])
def test_a_compiled_jacquant_run_is_the_eager_run_bitwise(vr, quantizer):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.ReLU(), torch.nn.Linear(24, 5))
    base = metaste.quantize_model(net, bits=2, quantizer=quantizer, keep_last=False)
    runs = eager_and_compiled_runs(
        passes,
        base,
        lambda m: _jacquant(m, vr),
        7,
        lambda m, o: ([t.detach().clone() for t in (*m.parameters(), *o.alpha, *o.gamma)], o.phases),
        32,
    )
    assert "_jq_step_slopes" in _compile._COMPILED
    (eager, phases_e), (compiled, phases_c) = runs
    assert phases_e == phases_c and all(torch.equal(a, b) for a, b in zip(eager, compiled))
