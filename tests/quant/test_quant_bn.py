"""recalibrate_bn: cumulative-average re-estimation, modes and momenta restored."""

import pytest
import torch
from torch import nn

import metaste


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
        nn.BatchNorm1d(4),
        nn.Dropout(0.5),
        nn.Linear(4, 2),
    )


def _batches(k=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 5, 5, generator=g) * 2 + 1, torch.zeros(n)) for n in (8, 5, 11)[:k]]


def _expected_stats(pre, batches, dims):
    """Mean over batches of each batch's mean and unbiased variance of the BN input."""
    with torch.no_grad():
        ins = [pre(x) for x, _ in batches]
    mean = torch.stack([t.mean(dims) for t in ins]).mean(0)
    var = torch.stack([t.var(dims, unbiased=True) for t in ins]).mean(0)
    return mean, var


@pytest.mark.parametrize("quantized", [False, True])
def test_recalibrate_bn_recomputes_the_cumulative_running_statistics(quantized):
    model = _model()
    if quantized:
        model = metaste.quantize_model(model, bits=2, keep_last=False)
    model.train()(torch.randn(6, 2, 5, 5) * 10)  # stale statistics
    model.eval()
    batches = _batches()
    assert metaste.recalibrate_bn(model, batches) == 3
    mean2d, var2d = _expected_stats(model[0], batches, (0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, mean2d)
    torch.testing.assert_close(model[1].running_var, var2d)
    assert model[1].num_batches_tracked.item() == 3
    # the second BN sees the first in train mode (batch statistics), as during the pass
    first_block = model[:5].train()
    mean1d, var1d = _expected_stats(first_block, batches, (0,))
    torch.testing.assert_close(model[5].running_mean, mean1d)
    torch.testing.assert_close(model[5].running_var, var1d)


def test_recalibrate_bn_restores_each_modules_mode_and_each_bn_momentum():
    model = _model().eval()
    model[6].train()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    seen_modes = []
    metaste.recalibrate_bn(
        model, _batches(), forward=lambda m, b: (seen_modes.append(m[1].training), m(b[0]))
    )
    assert seen_modes == [True, True, True]
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert model[1].momentum == 0.3 and model[5].momentum == 0.1


def test_recalibrate_bn_accepts_plain_tensor_batches_and_leaves_weights_and_grads_alone():
    model = _model()
    before = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    metaste.recalibrate_bn(model, [x for x, _ in _batches()])
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_recalibrate_bn_without_batches_raises_and_keeps_the_old_statistics():
    model = _model()
    model.train()(torch.randn(6, 2, 5, 5))
    old = model[1].running_mean.clone()
    model.eval()
    with pytest.raises(ValueError, match="no batches"):
        metaste.recalibrate_bn(model, [])
    assert torch.equal(model[1].running_mean, old) and not model.training and model[1].momentum == 0.3
