"""quantize_model, the layers and the parameter registry (docs/design.md §1)."""

import copy
import math

import pytest
import torch
from torch import nn

import metaste
from metaste.quant import QuantConv2d, QuantLinear, lookup, quantized_weights, surrogate_parameters


class MyLinear(nn.Linear):
    """A subclass: quantize_model swaps exact types only."""


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.ReLU()),
        nn.Flatten(),
        MyLinear(36, 8),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 2))


def test_quantize_model_swaps_exactly_linear_and_conv2d_and_keeps_the_last_layer_float():
    model = _cnn()
    q = metaste.quantize_model(model, bits=2)
    assert type(q[0]) is QuantConv2d and type(q[2][0]) is QuantConv2d
    assert type(q[4]) is MyLinear  # a subclass is left alone
    assert type(q[5]) is QuantLinear
    assert type(q[7]) is nn.Linear  # the last layer stays float
    assert type(model[0]) is nn.Conv2d  # the input model is not modified
    q_all = metaste.quantize_model(model, bits=2, keep_last=False)
    assert type(q_all[7]) is QuantLinear


def test_keep_fp_keeps_named_modules_and_everything_inside_a_named_container():
    model = _cnn()
    q = metaste.quantize_model(model, bits=2, keep_fp=["0", "2"])
    assert type(q[0]) is nn.Conv2d and type(q[2][0]) is nn.Conv2d and type(q[5]) is QuantLinear
    q = metaste.quantize_model(model, bits=2, keep_fp="5")
    assert type(q[5]) is nn.Linear and type(q[0]) is QuantConv2d


def test_quantize_model_copies_weights_and_biases_bitwise_and_keeps_conv_settings():
    model = _cnn()
    q = metaste.quantize_model(model, bits=3, quantizer="fixed")
    for i in (0, 5):
        assert torch.equal(q[i].weight, model[i].weight) and torch.equal(q[i].bias, model[i].bias)
        assert q[i].weight is not model[i].weight
    assert torch.equal(q[2][0].weight, model[2][0].weight) and q[2][0].bias is None
    assert q[2][0].stride == (2, 2) and q[0].padding == (1, 1)


def test_quantize_model_does_not_advance_the_global_rng():
    model = _cnn()
    state = torch.get_rng_state()
    metaste.quantize_model(model, bits=2)
    assert torch.equal(torch.get_rng_state(), state)


def _fake_quant(w, bits):
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s = 2 * w.abs().mean() / math.sqrt(qp)
    return torch.clamp(torch.round(w / s), -qn, qp) * s


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_mlp_output_equals_a_hand_built_fake_quant_forward(bits):
    model = _mlp()
    q = metaste.quantize_model(model, bits=bits)
    x = torch.randn(9, 5)
    h = torch.relu(nn.functional.linear(x, _fake_quant(model[0].weight.detach(), bits), model[0].bias))
    h = torch.relu(nn.functional.linear(h, _fake_quant(model[2].weight.detach(), bits), model[2].bias))
    ref = model[4](h)
    assert torch.equal(q(x), ref)


def test_quantized_cnn_output_equals_a_hand_built_fake_quant_forward_with_activation_quantizers():
    model = _cnn()
    q = metaste.quantize_model(model, bits=2, act_bits=3)
    x = torch.rand(4, 1, 8, 8)
    out = q(x)  # train-mode forward: sets each activation step from its first batch
    seen = {}

    def act(name, t):  # unsigned 3-bit grid after a ReLU, signed where the input has negatives
        qn, qp = (4, 3) if bool((t < 0).any()) else (0, 7)
        s = 2 * t.abs().mean() / math.sqrt(qp) + 1e-8
        seen[name] = s
        return torch.clamp(torch.round(t / s), -qn, qp) * s

    h = torch.relu(
        nn.functional.conv2d(act(0, x), _fake_quant(model[0].weight.detach(), 2), model[0].bias, padding=1)
    )
    h = torch.relu(nn.functional.conv2d(act(2, h), _fake_quant(model[2][0].weight.detach(), 2), stride=2))
    h = model[4](h.flatten(1))
    h = torch.relu(nn.functional.linear(act(5, h), _fake_quant(model[5].weight.detach(), 2), model[5].bias))
    torch.testing.assert_close(out, model[7](h), rtol=0, atol=0)
    assert q[2][0].act_quant is not None and q[7].__class__ is nn.Linear


def test_registry_maps_each_quantized_weight_to_its_quantizer():
    q = metaste.quantize_model(_cnn(), bits=3, per_channel=True)
    names = [n for n, _ in quantized_weights(q)]
    assert names == ["0.weight", "2.0.weight", "5.weight"]
    entry = lookup(q[0].weight)
    assert entry.quantizer is q[0].weight_quant and (entry.qn, entry.qp) == (4, 3)
    assert entry.ste_kind == "identity" and entry.surrogate is q[0].weight_quant.surrogate
    assert torch.equal(entry.scale(), q[0].weight_quant.s.detach()) and entry.scale().shape == (4, 1, 1, 1)
    assert torch.equal(entry.u(), q[0].weight.detach() / q[0].weight_quant.s.detach())
    assert lookup(q[7].weight) is None and lookup(q[0].bias) is None


def test_registry_lookups_work_after_deepcopy_and_point_to_the_copy():
    q = metaste.quantize_model(_mlp(), bits=2, surrogate="slste")
    c = copy.deepcopy(q)
    entry = lookup(c[0].weight)
    assert entry is not None and entry.quantizer is c[0].weight_quant
    assert entry.quantizer is not q[0].weight_quant
    assert lookup(q[0].weight).quantizer is q[0].weight_quant


def test_surrogate_parameters_are_buffers_in_state_dict_and_survive_a_round_trip():
    q = metaste.quantize_model(_mlp(), bits=2, surrogate="dlste", granularity="channel")
    sp = dict(surrogate_parameters(q))
    assert sorted(sp) == ["0.weight_quant.surrogate.a_n", "0.weight_quant.surrogate.a_p"] + [
        "2.weight_quant.surrogate.a_n",
        "2.weight_quant.surrogate.a_p",
    ]
    param_ids = {id(p) for p in q.parameters()}
    assert all(id(t) not in param_ids for t in sp.values())
    for i, t in enumerate(sp.values()):
        t.fill_(0.5 + i / 4)
    state = q.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sp.items())
    fresh = metaste.quantize_model(_mlp(), bits=2, surrogate="dlste", granularity="channel")
    fresh.load_state_dict(state)
    for k, v in surrogate_parameters(fresh):
        assert torch.equal(v, sp[k])
    assert lookup(fresh[0].weight).quantizer is fresh[0].weight_quant


def test_lsq_step_is_a_model_parameter_and_fixed_step_is_a_buffer():
    q = metaste.quantize_model(_mlp(), bits=2)
    assert "0.weight_quant.s" in dict(q.named_parameters())
    f = metaste.quantize_model(_mlp(), bits=2, quantizer="fixed")
    assert "0.weight_quant.s" not in dict(f.named_parameters()) and "0.weight_quant.s" in f.state_dict()


def test_float64_model_gets_float64_surrogate_parameters():
    q = metaste.quantize_model(_mlp().double(), bits=2, surrogate="plste")
    assert q[0].weight_quant.surrogate.a.dtype == torch.float64
    q(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    assert q[0].weight.grad.dtype == torch.float64


def test_registry_keeps_the_quantizer_of_a_weight_whose_model_was_dropped():
    params = list(
        metaste.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), bits=2).parameters()
    )
    import gc

    gc.collect()
    entry = metaste.quant.lookup(params[0])
    assert entry is not None and entry.qp == 1
    assert entry.scale().numel() == 1


def test_fixed_init_lsq_sets_the_lsq_formula_step_and_freezes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4))
    q = metaste.quantize_model(model, bits=2, quantizer="fixed", fixed_init="lsq", keep_last=False)
    for fp, ql in ((model[0], q[0]), (model[2], q[2])):
        expected = 2 * fp.weight.detach().abs().mean() / math.sqrt(1)  # Qp = 1 at 2 bits
        torch.testing.assert_close(ql.weight_quant.s, expected.reshape_as(ql.weight_quant.s))
        assert not isinstance(ql.weight_quant.s, nn.Parameter)
    q_max = metaste.quantize_model(model, bits=3, quantizer="fixed", keep_last=False)
    torch.testing.assert_close(
        q_max[0].weight_quant.s,
        (model[0].weight.detach().abs().max() / 3).reshape_as(q_max[0].weight_quant.s),
    )


def test_a_quant_config_gives_the_same_model_as_its_keywords_and_keywords_override_it():
    cfg = metaste.QuantConfig(bits=3, quantizer="fixed", surrogate="slste", per_channel=True, act_bits=4)
    a = metaste.quantize_model(_cnn(), cfg)
    b = metaste.quantize_model(
        _cnn(), bits=3, quantizer="fixed", surrogate="slste", per_channel=True, act_bits=4
    )
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(a(x), b(x))
    assert a.state_dict().keys() == b.state_dict().keys()
    c = metaste.quantize_model(_cnn(), cfg, bits=2)
    assert next(e for _, e in quantized_weights(c)).qp == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'bitz'"):
        metaste.quantize_model(_cnn(), bitz=2)


def test_from_float_builds_the_quantized_layer_of_a_float_one():
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=True).eval()
    q = QuantConv2d.from_float(conv, metaste.QuantConfig(bits=4))
    assert isinstance(q, QuantConv2d) and not q.training
    assert (q.stride, q.padding, q.groups) == ((2, 2), (1, 1), 2)
    assert torch.equal(q.weight, conv.weight) and torch.equal(q.bias, conv.bias)
    assert lookup(q.weight).quantizer is q.weight_quant
    lin = nn.Linear(5, 3, bias=False)
    ql = QuantLinear.from_float(lin)
    assert ql.bias is None and torch.equal(ql.weight, lin.weight) and ql.weight_quant.qp == 1


def test_a_user_mapping_quantizes_a_user_layer_type():
    class QuantMyLinear(QuantLinear):
        pass

    model = metaste.quantize_model(_cnn(), mapping={MyLinear: QuantMyLinear, nn.Linear: QuantLinear})
    assert type(model[4]) is QuantMyLinear and type(model[5]) is QuantLinear
    assert type(model[0]) is nn.Conv2d  # not in this mapping
    assert type(metaste.quantize_model(_cnn())[4]) is MyLinear  # the default mapping: exact types
