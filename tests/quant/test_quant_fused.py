"""The quantizers' compiled backward: above FUSE_MIN elements it runs as a compiled pass
(metaste._compile.kernel) that gives the eager path's values, bit for bit."""

import pytest
import torch

import metaste._compile as compile_
from metaste.quant import _functions as functions
from metaste.quant.quantizers import DoReFaBinaryQuantizer, FixedScaleQuantizer, LSQQuantizer
from metaste.quant.surrogate_factory import make_surrogate

pytestmark = pytest.mark.compiled

KINDS = ["ste", "hardtanh", "approxsign", "pwl", "slste", "plste", "dlste", "leaky"]


def _surrogate(kind, shape, binary, dtype):
    granularity = "tensor" if kind == "leaky" else "element"
    s = make_surrogate(kind, shape, binary=binary, dtype=dtype, granularity=granularity)
    gen = torch.Generator().manual_seed(1)
    for t in s.params() if s.learnable or kind == "leaky" else ():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=dtype) * 2 + 0.5)
    return s


def _grads(make, dtype, fused, monkeypatch, specials=True):
    """Forward and backward of a fresh quantizer from ``make``: (v̂, ∂L/∂v, ∂L/∂s or None)."""
    monkeypatch.setattr(functions, "FUSE_MIN", 1 if fused else 1 << 40)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 80, generator=gen, dtype=dtype) * 0.3).requires_grad_()
    q = make(w)
    with torch.no_grad():  # after the step size's initialisation from w (DoReFa's E = mean|w|: none)
        if specials:
            w[0, :4] = torch.tensor([float("nan"), 0.0, -0.0, float("inf")], dtype=dtype)
    out = q(w)
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    g[1, :3] = torch.tensor([0.0, -0.0, float("nan")], dtype=dtype)
    out.backward(g)
    s = getattr(q, "s", None)
    return out.detach(), w.grad, None if s is None or s.grad is None else s.grad


def _bits(x):
    """The tensor's bits with every NaN made one NaN (compiled and eager NaNs may differ in sign)."""
    x = torch.where(torch.isnan(x), torch.full_like(x, float("nan")), x)
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


QUANTIZERS = ["lsq", "fixed", "lsq-channel", "dorefa", "deferred"]
# Each case compiles its own kernels (the cold compile cache is what this file costs), so the cases
# are those whose kernels differ: every ψ with each backward (LSQ's with ∂L/∂s, the fixed step's
# without, DoReFa's sign) in float32 and with LSQ in float64; a per-channel step and a deferred ψ
# with the STE in both.
CASES = (
    [(q, k, torch.float32) for q in ("lsq", "fixed", "dorefa") for k in KINDS]
    + [("lsq", k, torch.float64) for k in KINDS]
    + [(q, "ste", dt) for q in ("lsq-channel", "deferred") for dt in (torch.float32, torch.float64)]
)


@pytest.mark.parametrize("quantizer,kind,dtype", CASES)
def test_compiled_quantizer_passes_equal_the_eager_ones_bitwise(quantizer, kind, dtype, monkeypatch):
    compile_._BROKEN.clear()
    binary = quantizer == "dorefa"

    def make(w):
        s = _surrogate(kind, w.shape, binary, dtype)
        if quantizer == "dorefa":
            return DoReFaBinaryQuantizer(s)
        if quantizer == "fixed":
            return FixedScaleQuantizer(w, 2, s)
        q = LSQQuantizer(w, 3, s, per_channel=quantizer == "lsq-channel")
        q.defer_surrogate = quantizer == "deferred"
        return q

    eager = _grads(make, dtype, False, monkeypatch, not binary)
    calls = []
    real = functions.kernel
    monkeypatch.setattr(
        functions, "kernel", lambda fn, kind_, fused: calls.append(fused) or real(fn, kind_, fused)
    )
    fused = _grads(make, dtype, True, monkeypatch, not binary)
    assert not compile_._BROKEN, compile_._BROKEN
    assert calls and all(calls)  # every pass of the second run was compiled
    assert "_round_backward" in compile_._COMPILED or quantizer == "dorefa"
    for a, b in zip(eager, fused):
        assert (a is None) == (b is None)
        if a is not None:
            if a.numel() > 1:  # (a per-tensor ∂L/∂s sums the NaN element: NaN)
                assert a.abs().nan_to_num(posinf=0).max() > 0 and torch.isnan(a).sum() < a.numel() / 10
            assert torch.equal(_bits(a), _bits(b))


def test_compiled_passes_step_aside_under_transforms_and_grad_recording(monkeypatch):
    """A torch.func transform, a double backward and an enclosing torch.compile run the eager ops."""
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert compile_.compilable(x, torch.nn.Parameter(x.clone()))
        assert not torch.vmap(lambda r: torch.tensor(compile_.compilable(r)))(x).any()
        assert not torch.compile(lambda r: r + compile_.compilable(r), backend="eager")(x).ne(x).any()
    assert compile_.compilable(x) and not compile_.compilable(x.requires_grad_())  # autograd would record
    monkeypatch.setattr(functions, "FUSE_MIN", 1)
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    q = LSQQuantizer(w, 2, make_surrogate("slste", w.shape, dtype=torch.float64))
    (gw,) = torch.autograd.grad(q(w).pow(2).sum(), w, create_graph=True)  # eager: a graph for the 2nd order
    assert gw.requires_grad


def test_metaste_fused_0_turns_every_compiled_pass_off(monkeypatch):
    """``METASTE_FUSED=0`` (read at import into ``ENABLED``): kernel() hands back the eager function."""
    fn = functions._round_backward
    assert compile_.kernel(fn, "quant", True) is not fn
    monkeypatch.setattr(compile_, "ENABLED", False)
    assert compile_.kernel(fn, "quant", True) is fn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["ste", "slste", "plste"])
def test_cuda_compiled_backward_stays_on_the_device_and_matches_eager(kind, monkeypatch):
    """On a GPU the backward compiles to a Triton kernel (which may contract a multiply-add: compared
    to rounding, not bitwise) and keeps everything on the device."""
    grads = []
    for limit in (1 << 40, 1):
        monkeypatch.setattr(functions, "FUSE_MIN", limit)
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(256, 300, generator=gen) * 0.3).cuda().requires_grad_()
        q = LSQQuantizer(w, 3, _surrogate(kind, w.shape, False, torch.float32).cuda())
        out = q(w)
        out.backward(torch.randn(out.shape, generator=gen).cuda())
        assert w.grad.device.type == "cuda" and q.s.grad.device.type == "cuda"
        grads.append((w.grad.cpu(), q.s.grad.cpu()))
    assert not compile_._BROKEN, compile_._BROKEN
    for eager, fused in zip(*grads):
        assert eager.abs().max() > 0
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-7)
