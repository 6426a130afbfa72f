"""Integer export: codes in range, and an integer forward bitwise equal to the fake-quant one."""

import pytest
import torch
from torch import nn

import metaste
from metaste.quant import IntegerConv2d, IntegerLinear, QuantLayer

# signed raw inputs reach the first layer's (unsigned) activation quantizer on purpose here:
# export must reproduce the fake-quant forward whatever it clips
pytestmark = pytest.mark.filterwarnings("ignore:unsigned .*activation quantizer got negative inputs")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _train_a_little(model, x, steps=3):
    """A few SGD steps so that LSQ steps, BN statistics and activation steps move off their init."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model.eval()


CONFIGS = [
    dict(bits=2),
    dict(bits=4, quantizer="fixed", per_channel=True),
    dict(bits=12, per_channel=True),
    dict(bits=1, quantizer="dorefa"),
    dict(bits=1, quantizer="dorefa", binary_surrogate_scale="one", surrogate="plste"),
    dict(bits=3, surrogate="slste", keep_last=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("make,shape", [(_mlp, (32, 12)), (_cnn, (16, 1, 8, 8))], ids=["mlp", "cnn"])
@pytest.mark.parametrize("act_bits", [None, 4])
def test_integer_forward_equals_the_fake_quant_eval_forward_bitwise(cfg, make, shape, act_bits):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model = _train_a_little(metaste.quantize_model(make(), act_bits=act_bits, **cfg), x)
    ref = model(x)
    integer = metaste.to_integer_model(model)
    assert not integer.training
    assert torch.equal(integer(x), ref)
    layers = [m for m in integer.modules() if isinstance(m, (IntegerLinear, IntegerConv2d))]
    assert len(layers) == sum(isinstance(m, QuantLayer) for m in model.modules()) > 0
    assert all("weight" not in dict(m.named_parameters()) for m in layers)
    assert all((m.act_quant is not None) == (act_bits is not None) for m in layers)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_exported_codes_are_integers_in_range_and_dequantize_to_the_fake_quant_weight(cfg):
    model = metaste.quantize_model(_cnn(), act_bits=3, **cfg)
    model(torch.randn(4, 1, 8, 8))
    exported = metaste.export_quantized(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    assert list(exported) == list(layers)
    bits = cfg["bits"]
    for name, qw in exported.items():
        layer = layers[name]
        assert qw.bits == bits and qw.codes.shape == layer.weight.shape
        assert qw.codes.dtype == (torch.int8 if bits <= 8 else torch.int32)
        if bits == 1:
            assert set(qw.codes.unique().tolist()) <= {-1, 1}
        else:
            assert (qw.qn, qw.qp) == (2 ** (bits - 1), 2 ** (bits - 1) - 1)
            assert qw.codes.min() >= -qw.qn and qw.codes.max() <= qw.qp
        assert torch.equal(qw.dequantize(), layer.quantized_weight())
        assert qw.bias is None if layer.bias is None else torch.equal(qw.bias, layer.bias)
        assert qw.act_bits == 3 and torch.equal(qw.act_scale, layer.act_quant.s.detach())


def test_dorefa_export_uses_mean_abs_as_scale_and_plus_one_for_zero_weights():
    model = metaste.quantize_model(_mlp(), bits=1, quantizer="dorefa", binary_surrogate_scale="one")
    with torch.no_grad():
        model[0].weight[0, :3] = 0.0
    qw = metaste.export_quantized(model)["0"]
    assert torch.equal(qw.codes[0, :3], torch.ones(3, dtype=torch.int8))
    assert torch.equal(qw.scale, model[0].weight.detach().abs().mean())


def test_integer_model_state_dict_holds_integer_codes():
    model = metaste.quantize_model(_mlp(), bits=2).eval()
    state = metaste.to_integer_model(model).state_dict()
    assert state["0.codes"].dtype == torch.int8 and "0.weight" not in state
    assert torch.equal(state["0.bias"], model[0].bias.detach())
