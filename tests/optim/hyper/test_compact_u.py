"""The delayed record's u_t as SLSTE's one-byte code against the full u."""

import pytest
import torch

from metaste.quant.surrogate_factory import make_surrogate


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


@pytest.mark.compiled
@pytest.mark.parametrize("boundary", ["none", "window"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_compiled_surrogate_grads_give_the_eager_trajectory_bitwise(boundary, opt_name, monkeypatch):
    """above FUSE_MIN, delayed's λ, region code and clipped count are one compiled pass
    (``_slste_lambda``); a run with it equals the eager run bit for bit."""
    import metaste._compile as compile_
    from metaste import HyperSTE
    from metaste.optim.hyper import _common
    from tests.helpers.hyperste import batches, loss_fn, quantized_mlp

    runs = []
    for limit in (1 << 40, 1):
        monkeypatch.setattr(_common, "FUSE_MIN", limit)
        model = quantized_mlp(surrogate="slste", boundary=boundary)
        base = (
            torch.optim.SGD(model.parameters(), lr=0.1)
            if opt_name == "sgd"
            else torch.optim.Adam(model.parameters())
        )
        opt = HyperSTE(base, method="delayed", hyper_lr=0.5, boundary=boundary)
        for x, y in batches(6, size=16):
            opt.step(lambda x=x, y=y, m=model: loss_fn(m, x, y))
        runs.append((model.state_dict(), opt.diagnostics["layers"]))
    assert not compile_._BROKEN, compile_._BROKEN
    assert "_slste_lambda" in compile_._COMPILED
    (sd0, d0), (sd1, d1) = runs
    assert any(not torch.equal(v, torch.ones_like(v)) for k, v in sd0.items() if k.endswith(".a"))  # θ moved
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    assert [v["clipped_frac"] for v in d0.values()] == [v["clipped_frac"] for v in d1.values()]
