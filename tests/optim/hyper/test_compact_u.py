"""The delayed record's u_t as SLSTE's one-byte code (issue 11) against the full u."""

import pytest
import torch

from metaste.quant.surrogates import make_surrogate


@pytest.mark.parametrize("granularity", ["element", "channel", "tensor"])
@pytest.mark.parametrize("boundary", ["none", "window"])
def test_slste_code_gives_psi_and_dpsi_of_the_full_u_bitwise(granularity, boundary):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(32, 24, generator=gen) * 3
    u[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    s = make_surrogate("slste", u.shape, granularity=granularity, boundary=boundary)
    with torch.no_grad():
        s.a.copy_(torch.rand(s.a.shape, generator=gen) * 3 + 0.25)
    qn, qp = 2.0, 1.0
    code = s.code(u, qn, qp)
    assert code.dtype == torch.uint8 and code.shape == u.shape
    for got, want in [
        (s.psi(code, qn, qp), s.psi(u, qn, qp)),
        (s.dpsi(code, qn, qp)[0], s.dpsi(u, qn, qp)[0]),
    ]:
        assert got.dtype == want.dtype and torch.equal(got, want)
    inplace = u.clone()
    assert torch.equal(s.code(inplace, qn, qp, inplace=True), code)


def test_code_is_only_for_slste():
    u = torch.randn(4, 3)
    assert make_surrogate("plste", u.shape).code(u, 2.0, 1.0) is None
    assert make_surrogate("ste").code(u, 2.0, 1.0) is None
