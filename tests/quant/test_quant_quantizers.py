"""Forward quantizers and their backward (docs/design.md §1): LSQ, fixed, DoReFa, activation LSQ."""

import math
import warnings

import pytest
import torch

from metaste.quant import make_weight_quantizer
from metaste.quant.activation import ActivationLSQQuantizer
from metaste.quant.quantizers import FixedScaleQuantizer, LSQQuantizer
from metaste.quant.surrogate_factory import make_surrogate


def _weight(shape=(6, 10), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _lsq_dvds(u, qn, qp):
    return torch.where(u < -qn, -qn, torch.where(u > qp, qp, torch.round(u) - u))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_lsq_init_is_two_mean_abs_over_sqrt_qp(per_channel, bits):
    w = _weight((4, 3, 3, 3))
    q = LSQQuantizer(w, bits, make_surrogate("ste"), per_channel=per_channel)
    qp = 2 ** (bits - 1) - 1
    if per_channel:
        expected = torch.stack([2 * w[i].abs().mean() / math.sqrt(qp) for i in range(4)]).view(4, 1, 1, 1)
    else:
        expected = 2 * w.abs().mean() / math.sqrt(qp)
    torch.testing.assert_close(q.s.detach(), expected)
    assert isinstance(q.s, torch.nn.Parameter)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_forward_and_gradients_match_the_hand_formula(per_channel, bits):
    w = _weight((5, 8)).requires_grad_()
    q = LSQQuantizer(w, bits, make_surrogate("ste"), per_channel=per_channel)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    with torch.no_grad():  # a step that puts a good share of the weights outside the grid
        q.s.mul_({2: 0.6, 4: 0.25}[bits])
    g = _weight((5, 8), seed=1)
    out = q(w)
    s = q.s.detach()
    u = w.detach() / s
    torch.testing.assert_close(out, torch.clamp(torch.round(u), -qn, qp) * s, rtol=0, atol=0)
    out.backward(g)
    inside = ((u >= -qn) & (u <= qp)).to(w.dtype)
    assert 0 < inside.mean() < 1
    torch.testing.assert_close(w.grad, g * inside, rtol=0, atol=0)
    n = w[0].numel() if per_channel else w.numel()
    expected_s = (g * _lsq_dvds(u, qn, qp)).sum_to_size(s.shape) / math.sqrt(n * qp)
    assert q.s.grad.shape == q.s.shape
    torch.testing.assert_close(q.s.grad, expected_s)


def test_lsq_step_is_kept_positive_in_forward():
    w = _weight()
    q = LSQQuantizer(w, 2, make_surrogate("ste"))
    with torch.no_grad():
        q.s.fill_(-1.0)
    assert torch.isfinite(q(w)).all()
    assert q.scale(w).item() > 0


def test_fixed_scale_quantizer_uses_max_over_qp_and_is_not_trained():
    w = _weight().requires_grad_()
    q = FixedScaleQuantizer(w.detach(), 3, make_surrogate("ste"), per_channel=True)
    torch.testing.assert_close(q.s, w.detach().abs().amax(dim=1, keepdim=True) / 3)
    assert list(q.parameters()) == []
    q(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # max init: every u is inside [−Qn, Qp]


@pytest.mark.parametrize(
    "surrogate,kwargs",
    [("ste", {}), ("identity", {}), ("tanh", {"temperature": 0.5}), ("fd", {"h": 0.8}), ("pwl", {})],
)
def test_quantizer_backward_multiplies_by_a_fixed_psi(surrogate, kwargs):
    w = _weight().requires_grad_()
    q = make_weight_quantizer(w, bits=3, surrogate=surrogate, surrogate_kwargs=kwargs)
    g = _weight(seed=2)
    q(w).backward(g)
    expected = g * q.surrogate.psi(q.u(w.detach()), q.qn, q.qp)
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("surrogate", ["slste", "plste", "dlste"])
@pytest.mark.parametrize("granularity", ["element", "channel", "tensor"])
def test_quantizer_backward_multiplies_by_a_learnable_psi_at_its_current_parameters(surrogate, granularity):
    w = _weight().requires_grad_()
    q = make_weight_quantizer(w, bits=2, quantizer="fixed", surrogate=surrogate, granularity=granularity)
    gen = torch.Generator().manual_seed(3)
    for p in q.surrogate.params():
        p.copy_(torch.rand(p.shape, generator=gen) * 2 + 0.5)
    g = _weight(seed=2)
    q(w).backward(g)
    u = w.detach() / q.s
    p = [x.double() for x in q.surrogate.params()]
    if surrogate == "slste":
        psi = p[0] * ((p[0] * u >= -2) & (p[0] * u <= 1))
    else:
        a_n, a_p = (p[0], p[0]) if surrogate == "plste" else p
        psi = torch.where(
            u <= 0, (2 * a_n * (1 + a_n * u / 2)).clamp(min=0), (2 * a_p * (1 - a_p * u)).clamp(min=0)
        )
    torch.testing.assert_close(w.grad, g * psi)
    assert not torch.equal(w.grad, g * (u.abs() <= 1))  # the parameters mattered


@pytest.mark.parametrize("quantizer,bits", [("lsq", 2), ("fixed", 4), ("dorefa", 1)])
def test_defer_surrogate_returns_the_upstream_gradient_unchanged(quantizer, bits):
    w = _weight().requires_grad_()
    q = make_weight_quantizer(w, bits=bits, quantizer=quantizer, surrogate="plste")
    q.defer_surrogate = True
    g = _weight(seed=4)
    q(w).backward(g)
    assert torch.equal(w.grad, g)


def test_deferred_lsq_step_gradient_is_unchanged():
    w = _weight().requires_grad_()
    grads = []
    for defer in (False, True):
        q = make_weight_quantizer(w, bits=2, surrogate="slste")
        q.defer_surrogate = defer
        q(w).sum().backward()
        grads.append(q.s.grad)
    assert torch.equal(*grads)


def test_dorefa_forward_is_sign_times_mean_abs_with_sign_zero_plus_one():
    w = torch.tensor([[0.0, -0.0, 1.5, -0.25], [2.0, -3.0, 0.5, 0.0]], dtype=torch.float64)
    q = make_weight_quantizer(w, bits=1, quantizer="dorefa")
    e = w.abs().mean()
    sign = torch.tensor([[1.0, 1.0, 1.0, -1.0], [1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(q(w), sign * e)
    assert torch.equal(q.codes(w), sign.to(torch.int8))
    assert q.codes(w).dtype == torch.int8


@pytest.mark.parametrize("scale", ["E", "one"])
def test_dorefa_backward_uses_u_over_e_or_over_one(scale):
    w = torch.tensor([1.5, -1.5, 1.5, -1.5, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    q = make_weight_quantizer(w, bits=1, quantizer="dorefa", surrogate="ste", binary_surrogate_scale=scale)
    g = torch.arange(1.0, 7.0, dtype=torch.float64)
    q(w).backward(g)
    unit = w.detach().abs().mean() if scale == "E" else 1.0
    expected = g * ((w.detach() / unit).abs() <= 1)
    assert torch.equal(w.grad, expected)
    # the two choices differ on these weights: E ≈ 1.58 keeps |v| = 1.5, u = v clips it
    pattern = {"E": [1, 1, 1, 1, 1, 0], "one": [0, 0, 0, 0, 1, 0]}[scale]
    assert torch.equal(expected != 0, torch.tensor(pattern, dtype=torch.bool))


@pytest.mark.filterwarnings("ignore:unsigned .*negative inputs")
def test_activation_quantizer_is_unsigned_lsq_initialised_from_the_first_batch():
    x = torch.rand(16, 5, dtype=torch.float32) * 3 - 0.5
    aq = ActivationLSQQuantizer(2, signed=False)
    out = aq(x.requires_grad_())
    s0 = 2 * x.detach().abs().mean() / math.sqrt(3)
    torch.testing.assert_close(aq.s.detach(), s0)
    s = aq.s.detach()
    torch.testing.assert_close(out, torch.clamp(torch.round(x.detach() / s), 0, 3) * s)
    out.sum().backward()
    u = x.detach() / s
    assert torch.equal(x.grad, ((u >= 0) & (u <= 3)).float())
    expected_s = _lsq_dvds(u, 0, 3).sum() / math.sqrt(5 * 3)
    torch.testing.assert_close(aq.s.grad, expected_s)


def test_activation_quantizer_refuses_eval_before_its_step_is_set():
    aq = ActivationLSQQuantizer(4).eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        aq(torch.rand(2, 3))


def test_unsigned_activation_quantizer_warns_once_when_its_first_batch_has_negative_inputs():
    aq = ActivationLSQQuantizer(2, signed=False)
    with pytest.warns(UserWarning, match="negative inputs"):
        aq(torch.tensor([[-1.0, 2.0]]))
    assert (aq.qn, aq.qp) == (0, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aq(torch.tensor([[-1.0, 2.0]]))
        ActivationLSQQuantizer(2, signed=False)(torch.rand(3, 4))


def test_activation_quantizer_picks_the_signed_grid_from_a_first_batch_with_negatives():
    aq = ActivationLSQQuantizer(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = aq(torch.tensor([[-1.0, 2.0, 0.5]]))
    assert bool(aq.signed) and (aq.qn, aq.qp) == (4, 3)
    assert (y < 0).any()
    fresh = ActivationLSQQuantizer(3)
    fresh.load_state_dict(aq.state_dict())
    assert (fresh.qn, fresh.qp) == (4, 3)
    relu_fed = ActivationLSQQuantizer(3)
    relu_fed(torch.rand(4, 5))
    assert not bool(relu_fed.signed) and (relu_fed.qn, relu_fed.qp) == (0, 7)
