"""The small quantized models, batches and estimator inputs the FOGZO tests train and compare."""

import torch
import torch.nn.functional as F
from torch import nn

import metaste
from metaste.optim.fogzo.smoothing import SMOOTHINGS


def mlp(seed=0, dtype=torch.float32, binary=None, per_channel=False, quantizer="fixed", bn=False, drop=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 16), nn.BatchNorm1d(16)] if bn else [nn.Linear(8, 16)]
    layers += [nn.ReLU(), nn.Dropout(drop), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)]
    net = nn.Sequential(*layers).to(dtype)
    if binary is not None:
        return metaste.quantize_model(net, bits=1, quantizer="dorefa", surrogate=binary)
    return metaste.quantize_model(
        net, bits=2, quantizer=quantizer, surrogate="identity", per_channel=per_channel
    )


def batch(seed=1, size=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=g, dtype=dtype), torch.randint(0, 4, (size,), generator=g)


def closure_for(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def managed_inputs(model):
    """weights, grads, eps, kinds of the registry-managed weights, as FOGZO computes them."""
    ws, gs, es, ks = [], [], [], []
    for _, e in metaste.quantized_weights(model):
        ws.append(e.weight)
        gs.append(e.weight.grad)
        es.append(e.scale() * SMOOTHINGS[e.ste_kind].eps_bar)
        ks.append(e.ste_kind)
    return ws, gs, es, ks
