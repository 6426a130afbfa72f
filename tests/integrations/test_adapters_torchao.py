"""metaste.adapters on torchao 0.18 QAT models (QATConfig(..., step="prepare")): the step sizes are
torchao's own, live, and available before the first forward; FOGZO with scales_from(model)
equals FOGZO with hand-written lambdas; HyperSTE and models without fake quantization get clear
errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.integration import batches

pytest.importorskip("torchao", reason="needs the [torchao] extra: pip install 'metaste[torchao]'")

from torchao.quantization import quantize_  # noqa: E402
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: E402
from torchao.quantization.utils import get_group_qparams_symmetric  # noqa: E402

import metaste  # noqa: E402

GROUP = 5


def ao_model(granularity="per_group"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    kw = {"group_size": GROUP} if granularity == "per_group" else {}
    cfg = IntxFakeQuantizeConfig(torch.int4, granularity, **kw)
    quantize_(model, QATConfig(weight_config=cfg, step="prepare"))
    return model


def hand_written(model):
    """What a user had to write before the adapter: torchao's per-group scale, expanded."""

    def fn(w):
        return lambda: (
            get_group_qparams_symmetric(w.detach(), 4, GROUP)[0]
            .reshape(w.shape[0], -1)
            .repeat_interleave(GROUP, dim=1)
        )

    return {m.weight: (fn(m.weight), "identity") for m in (model[0], model[2])}


def test_scales_are_torchaos_own_before_the_first_forward_and_after_updates():
    model = ao_model()
    scales = metaste.adapters.scales_from(model)
    assert list(scales) == [model[0].weight, model[2].weight]
    assert model[0].weight_fake_quantizer.scale is None  # no forward yet, the adapter still knows s
    before = scales[model[0].weight][0]().clone()
    model(torch.randn(4, 10))
    fq = model[0].weight_fake_quantizer
    torch.testing.assert_close(before, fq.scale.reshape(20, -1).repeat_interleave(GROUP, 1), rtol=0, atol=0)
    with torch.no_grad():
        model[0].weight.mul_(2)
    model(torch.randn(4, 10))  # torchao recomputes its dynamic scale from the new weight
    after = scales[model[0].weight][0]()
    torch.testing.assert_close(after, fq.scale.reshape(20, -1).repeat_interleave(GROUP, 1), rtol=0, atol=0)
    assert torch.allclose(after, 2 * before)
    assert all(kind == "identity" for _, kind in scales.values())


def test_per_channel_scales_broadcast_without_expansion():
    model = ao_model("per_channel")
    s = metaste.adapters.torchao(model)[model[0].weight][0]()
    assert s.shape == (20, 1)


def run(model, scales, steps=5):
    opt = metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.05), total_steps=steps, n=2, scales=scales)
    losses = [opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y)).item() for x, y in batches(steps)]
    return losses, [p.detach().clone() for p in model.parameters()]


def test_fogzo_with_the_adapter_equals_fogzo_with_hand_written_lambdas():
    a = ao_model()
    losses, params = run(a, metaste.adapters.scales_from(a))  # built before torchao's first forward
    b = ao_model()
    ref_losses, ref_params = run(b, hand_written(b))
    assert losses == ref_losses
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))
    c = ao_model()
    ste = torch.optim.SGD(c.parameters(), lr=0.05)
    for x, y in batches(5):
        ste.zero_grad()
        F.cross_entropy(c(x), y).backward()
        ste.step()
    assert not torch.equal(params[0], c[0].weight)  # FOGZO replaced torchao's STE gradient


def test_a_model_without_fake_quantization_is_named():
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="found no torchao or brevitas module.*QATConfig"):
        metaste.adapters.scales_from(plain)
    with pytest.raises(ValueError, match="torchao found no fake-quantized weight.*IntxFakeQuantizer"):
        metaste.adapters.torchao(plain)


def test_hyperste_on_a_torchao_model_says_what_to_do():
    model = ao_model()
    with pytest.raises(ValueError, match=r"fake-quantized by torchao.*FOGZO\(opt, scales=metaste.adapters"):
        metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1), model=model)


def test_hyperste_without_model_knows_the_weights_an_adapter_has_seen():
    model = ao_model()
    metaste.adapters.scales_from(model)
    with pytest.raises(ValueError, match="fake-quantized by torchao"):
        metaste.HyperSTE(torch.optim.SGD(model.parameters(), lr=0.1))
