"""metaste.adapters on brevitas 0.13 models (QuantLinear, QuantConv2d; per-tensor, per-channel and
binary weights): live step sizes from the layers' own quant_weight(), FOGZO with
scales_from(model) equals FOGZO with hand-written lambdas, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("brevitas", reason="needs the [brevitas] extra: pip install 'metaste[brevitas]'")

import brevitas.nn as qnn  # noqa: E402
from brevitas.quant import Int8WeightPerChannelFloat, SignedBinaryWeightPerTensorConst  # noqa: E402

import metaste  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = qnn.QuantConv2d(1, 4, 3, weight_bit_width=3, weight_quant=Int8WeightPerChannelFloat)
        self.fc1 = qnn.QuantLinear(4 * 6 * 6, 16, bias=True, weight_bit_width=2)
        self.fc2 = qnn.QuantLinear(16, 8, bias=False, weight_quant=SignedBinaryWeightPerTensorConst)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def data(n=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_scales_and_kinds_are_the_layers_own():
    net = Net()
    scales = metaste.adapters.scales_from(net)
    assert list(scales) == [net.conv.weight, net.fc1.weight, net.fc2.weight]
    assert [k for _, k in scales.values()] == ["identity", "identity", "hardtanh"]
    s_conv = scales[net.conv.weight][0]()
    assert s_conv.shape == (4, 1, 1, 1)  # per output channel, broadcasts to the weight
    s_fc1 = scales[net.fc1.weight][0]()
    assert torch.equal(s_fc1, net.fc1.quant_weight().scale.detach())
    with torch.no_grad():
        net.fc1.weight.mul_(3)  # per-tensor scale from the weight's statistics: it follows the weight
    torch.testing.assert_close(scales[net.fc1.weight][0](), 3 * s_fc1)


def run(net, scales, steps=5):
    opt = metaste.FOGZO(torch.optim.SGD(net.parameters(), lr=0.05), total_steps=steps, scales=scales)
    losses = [opt.step(lambda x=x, y=y: F.cross_entropy(net(x), y)).item() for x, y in data(steps)]
    return losses, [p.detach().clone() for p in net.parameters()]


def test_fogzo_with_the_adapter_equals_fogzo_with_hand_written_lambdas():
    a = Net()
    losses, params = run(a, metaste.adapters.brevitas(a))
    b = Net()
    hand = {
        b.conv.weight: lambda: b.conv.quant_weight().scale.detach(),
        b.fc1.weight: lambda: b.fc1.quant_weight().scale.detach(),
        b.fc2.weight: (lambda: b.fc2.quant_weight().scale.detach(), "hardtanh"),
    }
    ref_losses, ref_params = run(b, hand)
    assert losses == ref_losses
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))
    assert not torch.equal(params[0], Net().conv.weight)


def test_a_model_without_quantized_weights_and_hyperste_get_clear_errors():
    with pytest.raises(ValueError, match="brevitas found no quantized weight.*quant_weight"):
        metaste.adapters.brevitas(nn.Sequential(nn.Linear(3, 3)))
    net = Net()
    with pytest.raises(
        ValueError,
        match=r"fake-quantized by brevitas.*quantize_model\(model, bits=\.\.\., surrogate='slste'\)",
    ):
        metaste.HyperSTE(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
