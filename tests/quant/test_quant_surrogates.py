"""Surrogates ψ against their closed forms (docs/design.md §2)."""

import math

import pytest
import torch
from scipy.integrate import quad

from metaste.quant import psi as P
from metaste.quant import surrogates as S
from metaste.quant.leaky import LeakySurrogate
from metaste.quant.learnable import DLSTE, PLSTE, SLSTE, psi_differentiable
from metaste.quant.surrogate_factory import SURROGATES, make_surrogate
from metaste.quant.surrogates import FixedSurrogate

GRIDS = [(1, 1), (2, 1), (4, 3), (8, 7)]  # binary and b = 2, 3, 4


def _random_u(n=4000, lo=-10.0, hi=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _edges(qn, qp):
    return torch.tensor([-qn, qp, 0.0, -1.0, 1.0, -qn - 1e-9, qp + 1e-9], dtype=torch.float64)


def _ref(fn, u):
    return torch.tensor([fn(x) for x in u.tolist()], dtype=torch.float64)


def _plste_ref(x, a, qn, qp):
    if -qn / a <= x <= 0:
        return 2 * a * (1 + a * x / qn)
    if 0 < x <= qp / a:
        return 2 * a * (1 - a * x / qp)
    return 0.0


def _fd_ref(x, qn, qp, h):
    return sum(1 / (2 * h) for j in range(qn + qp) if abs(x - (-qn + j + 0.5)) < h)


@pytest.mark.parametrize("qn,qp", GRIDS)
def test_fixed_surrogates_match_closed_forms(qn, qp):
    u = torch.cat([_random_u(), _edges(qn, qp)])
    cases = {
        "ste": lambda x: float(-qn <= x <= qp),
        "identity": lambda x: 1.0,
        "pwl": lambda x: _plste_ref(x, 1.0, qn, qp),
        "hardtanh": lambda x: float(abs(x) <= 1),
        "tanh": lambda x: 1 - math.tanh(x) ** 2,
        "approxsign": lambda x: max(0.0, 2 - 2 * abs(x)),
    }
    for name, ref in cases.items():
        torch.testing.assert_close(S.FIXED_SURROGATES[name](u, qn, qp), _ref(ref, u), msg=name)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_tanh_with_temperature_is_derivative_of_tanh_u_over_t(temperature):
    u = _random_u(lo=-4, hi=4)
    expected = _ref(lambda x: (1 - math.tanh(x / temperature) ** 2) / temperature, u)
    torch.testing.assert_close(make_surrogate("tanh", temperature=temperature).psi(u, 2, 1), expected)


@pytest.mark.parametrize("h", [0.1, 0.25, 0.5, 0.8, 1.0, 1.7])
@pytest.mark.parametrize("qn,qp", [(2, 1), (4, 3)])
def test_fd_matches_its_sum_of_boxes_including_overlapping_widths(h, qn, qp):
    u = _random_u(2000, -qn - 3, qp + 3)
    expected = _ref(lambda x: _fd_ref(x, qn, qp, h), u)
    torch.testing.assert_close(make_surrogate("fd", h=h).psi(u, qn, qp), expected, rtol=0, atol=0)


@pytest.mark.parametrize("h", [0.3, 1.0, 2.5])
def test_binary_fd_is_a_box_of_width_2h_and_height_1_over_h(h):
    u = _random_u(lo=-4, hi=4)
    expected = _ref(lambda x: float(abs(x) < h) / h, u)
    torch.testing.assert_close(make_surrogate("fd", binary=True, h=h).psi(u, 1, 1), expected)


@pytest.mark.parametrize("qn,qp", [(2, 1), (4, 3), (8, 7)])
def test_fd_with_half_width_equals_ste(qn, qp):
    u = _random_u(lo=-qn - 2, hi=qp + 2)
    assert torch.equal(P.fd(u, qn, qp, h=0.5), P.ste(u, qn, qp))


def test_binary_fd_defaults_to_width_one_and_equals_ste():
    u = _random_u(lo=-3, hi=3)
    assert torch.equal(make_surrogate("fd", binary=True).psi(u, 1, 1), P.ste(u, 1, 1))


def test_pwl_at_one_bit_is_approxsign():
    u = torch.cat([_random_u(lo=-2, hi=2), _edges(1, 1)])
    torch.testing.assert_close(P.pwl(u, 1, 1), P.approxsign(u, 1, 1))
    # both against the written-out formula (Bi-Real Net's 2 − 2|u| on |u| ≤ 1), so that a change to
    # one function alone cannot keep the test green, and the shape is not trivially 0 or 1
    ref = torch.clamp(2 - 2 * u.abs(), min=0)
    torch.testing.assert_close(P.approxsign(u, 1, 1), ref)
    torch.testing.assert_close(P.pwl(u, 1, 1), ref)
    assert bool(((ref > 0) & (ref < 2)).any()) and bool((ref == 0).any())


@pytest.mark.parametrize("qn,qp", GRIDS)
def test_slste_with_a_equal_one_matches_ste(qn, qp):
    u = torch.cat([_random_u(), _edges(qn, qp)]).float()
    assert torch.equal(P.slste(u, torch.ones(()), qn, qp), P.ste(u, qn, qp))
    fresh = SLSTE(u.shape)
    assert torch.equal(fresh.psi(u, qn, qp), P.ste(u, qn, qp))


@pytest.mark.parametrize("name", ["plste", "dlste"])
def test_fresh_plste_and_dlste_equal_pwl(name):
    u = _random_u().float()
    assert torch.equal(make_surrogate(name, u.shape).psi(u, 4, 3), P.pwl(u, 4, 3))


@pytest.mark.parametrize("a", [0.5, 0.8, 2.0, 3.0])
def test_binary_slste_equals_fd_with_width_one_over_a(a):
    u = _random_u(lo=-3, hi=3)
    at = torch.tensor(a, dtype=torch.float64)
    torch.testing.assert_close(P.slste(u, at, 1, 1), P.fd(u, 1, 1, h=1 / a, binary=True))


def _side_integrals(f, qn, qp, breaks):
    """(∫_{u≤0} f, ∫_{u>0} f) by adaptive quadrature with the kinks as break points."""
    neg = [b for b in breaks if -qn * 5 < b < 0]
    pos = [b for b in breaks if 0 < b < qp * 5]
    left = quad(f, -qn * 5, 0, points=neg or None, limit=200, epsabs=1e-12)[0]
    right = quad(f, 0, qp * 5, points=pos or None, limit=200, epsabs=1e-12)[0]
    return left, right


def _scalar(fn):
    return lambda x: float(fn(torch.tensor([x], dtype=torch.float64))[0])


@pytest.mark.parametrize("qn,qp", GRIDS)
@pytest.mark.parametrize("a_n,a_p", [(1.0, 1.0), (0.3, 0.3), (1.7, 0.6), (3.5, 2.2)])
def test_learnable_surrogates_conserve_mass_on_each_side(qn, qp, a_n, a_p):
    an, ap = torch.tensor(a_n, dtype=torch.float64), torch.tensor(a_p, dtype=torch.float64)
    breaks = [-qn / a_n, qp / a_n, -qn / a_p, qp / a_p]
    psis = {
        "slste": lambda u: P.slste(u, an, qn, qp),
        "plste": lambda u: P.plste(u, an, qn, qp),
        "dlste": lambda u: P.dlste(u, an, ap, qn, qp),
    }
    for name, fn in psis.items():
        left, right = _side_integrals(_scalar(fn), qn, qp, breaks)
        assert left == pytest.approx(qn, abs=1e-8), name
        assert right == pytest.approx(qp, abs=1e-8), name


@pytest.mark.parametrize("qn,qp", GRIDS)
@pytest.mark.parametrize("a_n,a_p", [(1.0, 1.0), (0.4, 2.5), (3.0, 0.7)])
def test_dpsi_da_integrates_to_zero_for_plste_and_dlste(qn, qp, a_n, a_p):
    an, ap = torch.tensor(a_n, dtype=torch.float64), torch.tensor(a_p, dtype=torch.float64)
    breaks = [-qn / a_n, qp / a_n, -qn / a_p, qp / a_p]
    grads = {
        "plste": lambda u: P.plste_grad(u, an, qn, qp),
        "dlste a_n": lambda u: P.dlste_grad(u, an, ap, qn, qp)[0],
        "dlste a_p": lambda u: P.dlste_grad(u, an, ap, qn, qp)[1],
    }
    for name, fn in grads.items():
        left, right = _side_integrals(_scalar(fn), qn, qp, breaks)
        assert left + right == pytest.approx(0.0, abs=1e-8), name


@pytest.mark.parametrize("qn,qp,a", [(2, 1, 1.0), (4, 3, 0.6), (1, 1, 2.5)])
def test_slste_none_dpsi_da_is_psi_over_a_and_integrates_to_band_mass_over_a(qn, qp, a):
    at = torch.tensor(a, dtype=torch.float64)
    u = torch.cat([_random_u(), _edges(qn, qp)])
    assert torch.equal(P.slste_grad(u, at, qn, qp, "none"), P.slste(u, at, qn, qp) / at)
    left, right = _side_integrals(_scalar(lambda x: P.slste_grad(x, at, qn, qp)), qn, qp, [-qn / a, qp / a])
    assert left + right == pytest.approx((qn + qp) / a, abs=1e-8)


def _tau(u, qn, qp):
    return torch.where(u > 0, qp / u, torch.where(u < 0, -qn / u, torch.full_like(u, math.inf)))


@pytest.mark.parametrize("qn,qp", [(2, 1), (4, 3), (1, 1)])
@pytest.mark.parametrize("a", [0.5, 1.0, 1.9])
def test_dpsi_da_matches_central_finite_differences_in_a(qn, qp, a):
    delta = 1e-6
    u = _random_u(6000, -qn * 3, qp * 3)
    at = torch.tensor(a, dtype=torch.float64)
    # away from the discontinuities / kinks in a at a = τ(u)
    u = u[(at - _tau(u, qn, qp)).abs() > 1e-3]
    dual = [torch.tensor(x, dtype=torch.float64) for x in (a, 1.3 * a)]
    cases = {
        "slste": (lambda p: P.slste(u, p, qn, qp), P.slste_grad(u, at, qn, qp, "none")),
        "plste": (lambda p: P.plste(u, p, qn, qp), P.plste_grad(u, at, qn, qp)),
        "dlste a_n": (lambda p: P.dlste(u, p, dual[1], qn, qp), P.dlste_grad(u, at, dual[1], qn, qp)[0]),
        "dlste a_p": (lambda p: P.dlste(u, dual[1], p, qn, qp), P.dlste_grad(u, dual[1], at, qn, qp)[1]),
    }
    for name, (psi, grad) in cases.items():
        fd = (psi(at + delta) - psi(at - delta)) / (2 * delta)
        torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-6, msg=name)


def test_slste_window_dpsi_da_matches_hand_table():
    # 1{a ≤ τ} − (a/2b)·1{|a − τ| < b}, τ = Qp/u (u > 0), −Qn/u (u < 0), ∞ (u = 0); Qn = 2, Qp = 1
    table = [  # (a, b, u, expected)
        (1.0, 0.5, 0.5, 1.0),  # τ = 2: inside, far from the edge
        (1.0, 0.5, 0.8, 0.0),  # τ = 1.25: inside, near: 1 − 1
        (1.0, 0.5, 1.2, -1.0),  # τ = 0.833: outside, near
        (1.0, 0.5, 3.0, 0.0),  # τ = 1/3: outside, far
        (1.0, 0.5, 0.0, 1.0),  # τ = ∞
        (1.0, 0.5, -1.0, 1.0),  # τ = 2
        (1.0, 0.5, -1.8, 0.0),  # τ = 1.111
        (1.0, 0.5, -2.5, -1.0),  # τ = 0.8
        (1.0, 0.5, -5.0, 0.0),  # τ = 0.4
        (1.5, 0.25, 0.5, 1.0),  # τ = 2, |1.5 − 2| = 0.5 ≥ b
        (1.5, 0.25, 0.6, -2.0),  # τ = 1.667: 1 − 1.5/0.5
        (1.5, 0.25, 0.7, -3.0),  # τ = 1.429: 0 − 3
        (1.5, 0.25, -1.2, -2.0),  # τ = 1.667
    ]
    for a, b, u, expected in table:
        got = P.slste_grad(torch.tensor([u]), torch.tensor(a), 2, 1, "window", b)
        assert got.item() == pytest.approx(expected), (a, b, u)
    sur = make_surrogate("slste", (1,), boundary="window", b=0.25)
    sur.a.fill_(1.5)
    assert sur.dpsi(torch.tensor([0.6]), 2, 1)[0].item() == pytest.approx(-2.0)


@pytest.mark.parametrize("granularity", ["element", "channel", "tensor"])
@pytest.mark.parametrize(
    "name,boundary", [("slste", "none"), ("slste", "window"), ("plste", "none"), ("dlste", "none")]
)
def test_psi_differentiable_gradient_is_dpsi_summed_to_the_parameter_shape(granularity, name, boundary):
    gen = torch.Generator().manual_seed(1)
    shape = (4, 6)
    sur = make_surrogate(name, shape, granularity=granularity, boundary=boundary, dtype=torch.float64)
    params = [(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5) for p in sur.params()]
    params = [p.requires_grad_() for p in params]
    u = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    psi = psi_differentiable(sur, u, 2, 1, params)
    assert torch.equal(psi, sur.psi(u, 2, 1, params))
    grads = torch.autograd.grad((psi * w).sum(), params)
    expected = [(w * d).sum_to_size(p.shape) for d, p in zip(sur.dpsi(u, 2, 1, params), params)]
    for g, e, p in zip(grads, expected, params):
        assert g.shape == p.shape
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("granularity,pshape", [("element", (3, 5)), ("channel", (3, 1)), ("tensor", (1, 1))])
def test_learnable_parameters_have_the_granularity_shape_start_at_one_and_clamp(granularity, pshape):
    sur = DLSTE((3, 5), granularity=granularity, a_min=0.5, a_max=2.0)
    assert sur.param_names == ("a_n", "a_p")
    for p in sur.params():
        assert p.shape == pshape and torch.equal(p, torch.ones(pshape))
    sur.a_n.fill_(10.0)
    sur.a_p.fill_(0.01)
    sur.clamp_()
    assert torch.all(sur.a_n == 2.0) and torch.all(sur.a_p == 0.5)


def test_ste_kind_is_identity_for_multibit_and_the_matching_sign_kind_for_binary():
    assert make_surrogate("tanh").ste_kind == "identity"
    expected = {"ste": "hardtanh", "hardtanh": "hardtanh", "tanh": "tanh", "approxsign": "approxsign"}
    expected |= {"pwl": "approxsign", "fd": "hardtanh", "slste": "hardtanh", "plste": "approxsign"}
    expected |= {"dlste": "approxsign", "identity": "hardtanh", "leaky": "hardtanh"}
    assert set(expected) == set(SURROGATES)
    for name, kind in expected.items():
        granularity = "tensor" if name == "leaky" else "element"
        assert make_surrogate(name, (2, 2), binary=True, granularity=granularity).ste_kind == kind, name


@pytest.mark.parametrize(
    "name, cls",
    [("ste", FixedSurrogate), ("fd", FixedSurrogate), ("slste", SLSTE), ("plste", PLSTE), ("dlste", DLSTE)]
    + [("leaky", LeakySurrogate)],
)
def test_each_name_builds_its_class_and_a_learnable_one_holds_its_own_parameters(name, cls):
    granularity = "tensor" if name == "leaky" else "element"
    sur = make_surrogate(name, (3, 2), granularity=granularity)
    assert type(sur) is cls and sur.name == name
    assert sur.learnable == (cls in (SLSTE, PLSTE, DLSTE))
    if sur.learnable:
        assert sorted(dict(sur.named_buffers())) == sorted(sur.param_names)
        assert sur.param_names == (("a_n", "a_p") if name == "dlste" else ("a",))
