"""Bad input gets an error that names the value and the valid choices."""

import pytest
import torch
from torch import nn

import metaste
from metaste.quant import make_weight_quantizer
from metaste.quant.learnable import SLSTE
from metaste.quant.quantizers import FixedScaleQuantizer, LSQQuantizer
from metaste.quant.surrogate_factory import make_surrogate


def _mlp():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("bits", [0, -3, 17, 32])
def test_bits_out_of_range_is_a_value_error_naming_the_range(bits):
    with pytest.raises(ValueError, match=rf"bits: {bits}.*1 <= bits <= 16"):
        metaste.quantize_model(_mlp(), bits=bits)
    with pytest.raises(ValueError, match=rf"bits: {bits}"):
        metaste.quantize_model(_mlp(), bits=2, act_bits=bits)


@pytest.mark.parametrize("bits", [2.0, "2", True])
def test_non_integer_bits_is_a_type_error(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        metaste.quantize_model(_mlp(), bits=bits)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bfloat16, torch.float16])
def test_integer_and_reduced_precision_weights_are_a_type_error_naming_the_dtype(dtype):
    with pytest.raises(TypeError, match=rf"{dtype}.*float32/float64"):
        make_weight_quantizer(torch.zeros(3, 3, dtype=dtype), bits=2)
    if dtype.is_floating_point:
        with pytest.raises(TypeError, match=str(dtype)):
            metaste.quantize_model(_mlp().to(dtype), bits=2)


def test_unknown_quantizer_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'lsqq'.*'fixed', 'lsq', 'dorefa'"):
        metaste.quantize_model(_mlp(), quantizer="lsqq")


def test_unknown_surrogate_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'stee'.*'ste'.*'slste'"):
        metaste.quantize_model(_mlp(), surrogate="stee")
    with pytest.raises(TypeError, match="name"):
        make_surrogate(None)


@pytest.mark.parametrize("surrogate", ["ste", "slste"])
def test_unknown_granularity_or_boundary_names_it_and_the_choices_for_every_surrogate(surrogate):
    with pytest.raises(ValueError, match=r"'row'.*'element', 'channel', 'tensor'"):
        metaste.quantize_model(_mlp(), surrogate=surrogate, granularity="row")
    with pytest.raises(ValueError, match=r"'soft'.*'none', 'window'"):
        metaste.quantize_model(_mlp(), surrogate=surrogate, boundary="soft")


def test_surrogate_keyword_arguments_are_checked():
    with pytest.raises(TypeError, match=r"'h'.*accepts \['temperature'\]"):
        make_surrogate("tanh", h=0.5)
    with pytest.raises(ValueError, match="h: -0.5"):
        make_surrogate("fd", h=-0.5)
    with pytest.raises(ValueError, match="temperature: 0"):
        make_surrogate("tanh", temperature=0)
    with pytest.raises(ValueError, match=r"\[2.0, 4.0\]"):
        SLSTE((2, 2), a_min=2.0)


def test_keep_fp_naming_a_missing_module_lists_the_layers():
    with pytest.raises(ValueError, match=r"\['fc9'\].*\['0', '2'\]"):
        metaste.quantize_model(_mlp(), keep_fp=["fc9"])


def test_per_channel_scale_or_channel_granularity_on_a_1d_weight_names_the_shape():
    w = torch.randn(5)
    with pytest.raises(ValueError, match=r"per_channel=True.*\(5,\)"):
        LSQQuantizer(w, 2, make_surrogate("ste"), per_channel=True)
    with pytest.raises(ValueError, match=r"per_channel=True.*\(5,\)"):
        FixedScaleQuantizer(w, 2, make_surrogate("ste"), per_channel=True)
    with pytest.raises(ValueError, match=r"granularity='channel'.*\(5,\)"):
        make_weight_quantizer(w, bits=2, surrogate="slste", granularity="channel")


def test_one_bit_needs_dorefa_and_dorefa_needs_one_bit():
    for quantizer in ("lsq", "fixed"):
        with pytest.raises(ValueError, match=rf"bits=1 needs quantizer='dorefa' \(got '{quantizer}'\)"):
            metaste.quantize_model(_mlp(), bits=1, quantizer=quantizer)
    with pytest.raises(ValueError, match="bits=3"):
        metaste.quantize_model(_mlp(), bits=3, quantizer="dorefa")


def test_bad_binary_surrogate_scale_and_fixed_init_are_named():
    with pytest.raises(ValueError, match=r"'mean'.*'E' or 'one'"):
        metaste.quantize_model(_mlp(), bits=1, quantizer="dorefa", binary_surrogate_scale="mean")
    with pytest.raises(ValueError, match="'median'"):
        FixedScaleQuantizer(torch.randn(3, 3), 2, make_surrogate("ste"), init="median")
    with pytest.raises(ValueError, match="-0.1"):
        FixedScaleQuantizer(torch.randn(3, 3), 2, make_surrogate("ste"), init=-0.1)
