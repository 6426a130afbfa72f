"""The substrate on a user's edge cases: tied weights stay tied, quantizing twice takes the new
bits, quantizing nothing warns with the reason, a checkpoint of another grid is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.quant import QuantLinear, lookup

# -- tied weights stay tied ------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_share_one_latent_weight_and_one_quantizer_and_stay_tied():
    m = _Tied()
    q = metaste.quantize_model(m, bits=2)
    assert isinstance(q.a, QuantLinear) and isinstance(q.b, QuantLinear)
    assert q.a.weight is q.b.weight
    assert q.a.weight_quant is q.b.weight_quant
    assert lookup(q.a.weight).quantizer is q.a.weight_quant
    assert len(list(q.parameters())) == len(list(m.parameters())) + 1  # + the one shared LSQ step
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(q(x), y).backward()
        opt.step()
    assert q.a.weight is q.b.weight


def test_ties_survive_inplace_quantization_and_a_shared_module_is_swapped_everywhere():
    m = _Tied()
    q = metaste.quantize_model(m, bits=2, inplace=True)
    assert q is m and q.a.weight is q.b.weight
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    seq.append(seq[0])  # one module used twice
    seq.append(nn.Linear(4, 2))
    q = metaste.quantize_model(seq, bits=2)
    assert isinstance(q[0], QuantLinear) and q[2] is q[0]


def test_a_float_module_that_shares_a_quantized_weight_keeps_sharing_it():
    m = _Tied()
    m.head = nn.Linear(8, 8)
    m.head.weight = m.a.weight  # tied with the last layer, which stays float
    q = metaste.quantize_model(m, bits=2)
    assert type(q.head) is nn.Linear and q.head.weight is q.a.weight is q.b.weight


# -- quantizing twice ------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("inplace", [False, True])
def test_quantizing_twice_takes_the_new_bits(inplace):
    q2 = metaste.quantize_model(_mlp(), bits=2)
    w = q2[0].weight.detach().clone()
    q3 = metaste.quantize_model(q2, bits=3, inplace=inplace)
    assert q3[0].weight_quant.bits == 3 and q3[2].weight_quant.bits == 3
    assert (q3[0].weight_quant.qn, q3[0].weight_quant.qp) == (4, 3)
    assert torch.equal(q3[0].weight, w)  # from the latent weights
    assert type(q3[4]) is nn.Linear  # keep_last still keeps the last layer
    assert lookup(q3[0].weight).quantizer is q3[0].weight_quant
    keep = metaste.quantize_model(metaste.quantize_model(_mlp(), bits=2), bits=4, keep_fp=["0"])
    assert keep[0].weight_quant.bits == 2 and keep[2].weight_quant.bits == 4


# -- quantizing nothing warns with the reason ------------------------------------------------


class _TheirLinear(nn.Linear):
    """Stands for torchao's / brevitas' Linear subclasses."""


def test_linear_subclasses_of_another_library_warn_with_the_fix():
    m = nn.Sequential(_TheirLinear(4, 4), nn.ReLU(), _TheirLinear(4, 2))
    with pytest.warns(UserWarning, match=r"quantized nothing.*subclasses.*scales=.*register_quant_module"):
        metaste.quantize_model(m, bits=2)


def test_a_single_layer_model_warns_that_the_last_layer_is_kept():
    with pytest.warns(UserWarning, match=r"only Linear/Conv2d layer '0' is the last one.*keep_last=False"):
        q = metaste.quantize_model(nn.Sequential(nn.Linear(4, 2)), bits=2)
    with pytest.warns(UserWarning, match="no quantized layer"):
        assert metaste.export_quantized(q) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = metaste.quantize_model(nn.Sequential(nn.Linear(4, 2)), bits=2, keep_last=False)
        assert len(metaste.export_quantized(q)) == 1


def test_everything_in_keep_fp_warns():
    with pytest.warns(UserWarning, match="keep_fp"):
        metaste.quantize_model(_mlp(), bits=2, keep_fp=["0", "2"])


# -- a checkpoint of another grid does not load ----------------------------------------------


@pytest.mark.parametrize(
    "saved, now",
    [
        (dict(bits=2), dict(bits=3)),
        (dict(surrogate="plste"), dict(surrogate="slste")),
        (dict(quantizer="lsq"), dict(quantizer="fixed")),
        (dict(per_channel=True), dict(per_channel=False)),
        (dict(act_bits=4), dict(act_bits=3)),
    ],
)
def test_a_state_dict_of_another_grid_raises_naming_both(saved, now):
    src = metaste.quantize_model(_mlp(), **saved)
    dst = metaste.quantize_model(_mlp(), **now)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"saved with the grid .* this model's is"):
        dst.load_state_dict(src.state_dict())
    assert torch.equal(before["0.weight"], dst[0].weight)  # the layer was checked before it loaded


def test_the_same_grid_loads_and_a_float_state_dict_still_loads_into_the_weights():
    src = metaste.quantize_model(_mlp(), bits=3, surrogate="slste")
    dst = metaste.quantize_model(_mlp(), bits=3, surrogate="slste")
    dst.load_state_dict(src.state_dict())
    float_sd = _mlp().state_dict()
    missing = dst.load_state_dict(float_sd, strict=False).missing_keys
    assert "0.weight" not in missing
    aq = metaste.quantize_model(_mlp(), act_bits=3)[2].act_quant
    type(aq)(3).load_state_dict(aq.state_dict())
