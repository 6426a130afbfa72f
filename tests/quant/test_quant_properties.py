"""Property tests (hypothesis): codes in range, idempotent quantization, DoReFa sign(0) = +1."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaste.quant import make_weight_quantizer
from metaste.quant.quantizers import FixedScaleQuantizer
from metaste.quant.surrogate_factory import make_surrogate

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=True, width=32)
weights = st.lists(finite, min_size=1, max_size=40)
steps = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False)
SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(w=weights, bits=st.integers(2, 16), s=steps, quantizer=st.sampled_from(["lsq", "fixed"]))
def test_codes_are_always_within_the_grid(w, bits, s, quantizer):
    v = torch.tensor(w, dtype=torch.float32)
    q = make_weight_quantizer(v, bits=bits, quantizer=quantizer)
    codes = q.codes(v)
    assert codes.dtype == (torch.int8 if bits <= 8 else torch.int32)
    assert codes.min() >= -q.qn and codes.max() <= q.qp
    fixed = FixedScaleQuantizer(v, bits, make_surrogate("ste"), init=s)
    c = fixed.codes(v)
    assert c.min() >= -fixed.qn and c.max() <= fixed.qp


@SETTINGS
@given(w=weights, bits=st.integers(2, 16), s=steps)
def test_quantizing_a_quantized_weight_again_with_the_same_step_changes_nothing(w, bits, s):
    v = torch.tensor(w, dtype=torch.float32)
    q = FixedScaleQuantizer(v, bits, make_surrogate("ste"), init=s)
    vhat = q(v)
    assert torch.equal(q(vhat), vhat)
    assert torch.equal(q.codes(vhat), q.codes(v))


@SETTINGS
@given(w=weights, zeros=st.lists(st.integers(0, 39), max_size=5), negative_zero=st.booleans())
def test_dorefa_maps_zero_to_plus_one(w, zeros, negative_zero):
    v = torch.tensor(w, dtype=torch.float32)
    idx = torch.tensor([i % v.numel() for i in zeros], dtype=torch.long)
    v[idx] = -0.0 if negative_zero else 0.0
    q = make_weight_quantizer(v, bits=1, quantizer="dorefa")
    e = v.abs().mean()
    out = q(v)
    assert torch.equal(out[idx], e.expand(len(idx)))
    assert torch.equal(q.codes(v)[idx], torch.ones(len(idx), dtype=torch.int8))
    assert torch.equal(out, torch.where(v >= 0, e, -e))
