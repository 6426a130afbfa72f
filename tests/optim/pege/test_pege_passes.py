"""PEGE's compiled passes give the bits of their eager twins, and a PEGE run with them is the eager
run bit for bit."""

import pytest
import torch

import metaste
from metaste import _compile
from metaste.optim.pege import passes
from metaste.quant.surrogate_factory import make_surrogate
from tests.helpers.compiled import eager_and_compiled, eager_and_compiled_runs

pytestmark = pytest.mark.compiled


def _both(fn, *args):
    """fn(*args) with the passes eager, then compiled: the two outputs."""
    return [out for out, _ in eager_and_compiled(passes, fn, *args)]


def _same(a, b):
    """Bit for bit (None: both None)."""
    if a is None or b is None:
        return a is None and b is None
    bits = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(bits), b.view(bits))


@pytest.mark.parametrize(
    "name,binary,dtype,with_uniforms,per_channel",
    [
        ("ste", False, torch.float32, True, False),
        ("slste", False, torch.float32, False, True),
        ("dlste", False, torch.float64, True, False),
        ("approxsign", True, torch.float32, True, False),
        (None, False, torch.float32, True, True),
    ],
)
def test_front_compiled_gives_the_eager_bits(name, binary, dtype, with_uniforms, per_channel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 40, generator=g, dtype=dtype)
    x[0, :3] = torch.tensor([0.0, -0.0, 1.5], dtype=dtype)  # a tie of round, both zeros
    s = (torch.rand(48, 1, generator=g, dtype=dtype) + 0.2) if per_channel else torch.tensor(0.3, dtype=dtype)
    uniforms = torch.rand(x.shape, generator=g, dtype=dtype) if with_uniforms else None
    theta = ()
    if name in ("slste", "dlste"):
        sur = make_surrogate(name, x.shape, dtype=dtype)
        for t in sur.params():
            t.copy_(torch.rand(t.shape, generator=g, dtype=dtype) * 2 + 0.5)
        theta = sur.params()
    qn, qp = (1, 1) if binary else (2, 1)
    eager, fused = _both(passes.front, name, x, s, binary, uniforms, 0.37, 1e-3, qn, qp, theta)
    assert all(_same(a, b) for a, b in zip(eager, fused))
    e, e_scaled, mask = eager
    u = x / s
    c = torch.where(u >= 0, 1.0, -1.0).to(dtype) if binary else torch.clamp(torch.round(u), -qn, qp)
    assert torch.equal(e, u - c)  # the hand formula
    assert (mask is None) == (uniforms is None) and (e_scaled is None) == (name is None)
    if mask is not None:
        assert torch.equal(mask, (uniforms < torch.tensor(0.37, dtype=dtype)).to(dtype))


def test_the_mask_compares_as_the_python_float_did():
    """r as a tensor of x's dtype draws the mask that ``uniforms < r`` (a Python float) draws."""
    f = float(torch.tensor(0.1, dtype=torch.float32))
    r = f + 2**-40  # above the float32 f in double precision, f once rounded to float32
    u = torch.tensor([0.05, f, 0.2], dtype=torch.float32)
    _, _, mask = passes.front(None, u, torch.tensor(1.0), False, u, r, 0.0, 2, 1)
    assert torch.equal(mask, (u < r).to(u.dtype))


@pytest.mark.parametrize(
    "with_mask,with_e,with_pen",
    [(False, True, False), (False, False, True), (True, False, True), (True, True, True)],
)
def test_mix_and_its_backward_compiled_give_the_eager_bits(with_mask, with_e, with_pen):
    g0 = torch.Generator().manual_seed(1)
    v, vhat, g = (torch.randn(64, 33, generator=g0) for _ in range(3))
    mask = (torch.rand(v.shape, generator=g0) < 0.4).float() if with_mask else None
    e_scaled = torch.randn(v.shape, generator=g0) * 1e-3 if with_e else None
    pen = torch.randn(v.shape, generator=g0) * 1e-4 if with_pen else None
    (eager, args), (fused, _) = eager_and_compiled(passes, passes.mix_backward, g, mask, e_scaled, pen)
    assert all(_same(a, b) for a, b in zip(eager, fused))
    gv, gvhat = eager
    m = torch.zeros_like(g) if mask is None else mask
    if mask is None:
        assert gvhat is args[0]  # g passed through, not copied
    else:  # the hand formula: v gets (1 − M)g + M|g|ê + pen, v̂ gets Mg
        assert torch.equal(gvhat, g * m)
    want = (g - g * m) if mask is not None else None
    if e_scaled is not None:
        term = (g * m if mask is not None else g).abs() * e_scaled
        want = term if want is None else want + term
    if pen is not None:
        want = pen if want is None else want + pen
    assert _same(gv, want)
    if mask is not None:
        mixed = _both(passes.mix, mask, vhat, v)
        assert _same(*mixed) and torch.equal(mixed[0], torch.where(mask.bool(), vhat, v))


def test_penalty_grad_compiled_gives_the_eager_bits_and_the_formula():
    g0 = torch.Generator().manual_seed(2)
    e = torch.rand(50, 20, generator=g0) - 0.5
    s = torch.rand(50, 1, generator=g0) + 0.1
    mask = (torch.rand(e.shape, generator=g0) < 0.5).float()
    for m in (None, mask):
        eager, fused = _both(passes.penalty_grad, e, s, m, 0.03)
        assert _same(eager, fused)
        want = e * (2.0 * 0.03 / e.numel()) / s
        assert torch.equal(eager, want if m is None else want * m)


@pytest.mark.parametrize(
    "select,surrogate,quantizer,bits",
    [("random", "ste", "lsq", 2), ("error", "slste", "lsq", 2), ("random", "ste", "dorefa", 1)],
)
def test_a_compiled_pege_run_is_the_eager_run_bitwise(select, surrogate, quantizer, bits):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    base = metaste.quantize_model(net, bits=bits, quantizer=quantizer, surrogate=surrogate, keep_last=False)
    runs = eager_and_compiled_runs(
        passes,
        base,
        lambda m: metaste.PEGE(
            torch.optim.SGD(m.parameters(), lr=0.1), replace_steps=6, select=select, lam=0.1
        ),
        8,  # past T_r: the masks end at step 6
        lambda m, _: [t.detach().clone() for t in (*m.parameters(), *m.buffers())],
        24,
    )
    assert {"_pege_front", "_pege_mix", "_pege_mix_backward", "_pege_penalty_grad"} <= set(_compile._COMPILED)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
