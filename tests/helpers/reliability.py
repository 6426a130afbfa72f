"""Small models and the "nothing changed" check shared by the reliability tests and
the bad-input matrix: a Conv+BN+Linear net on 8×8 one-channel images, as a new user builds it."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import metaste


def cnn(
    seed=0,
    *,
    bits=2,
    surrogate="ste",
    quantizer="lsq",
    keep_last=True,
    act_bits=None,
    dtype=torch.float32,
    **quant,
):
    """Conv(1→4)+BN+ReLU+Linear(256→16)+ReLU+Linear(16→10), quantized."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    ).to(dtype)
    return metaste.quantize_model(
        net,
        bits=bits,
        surrogate=surrogate,
        quantizer=quantizer,
        keep_last=keep_last,
        act_bits=act_bits,
        **quant,
    )


def mlp(seed=0, *, surrogate="ste", quantizer="lsq"):
    """No BN, no dropout: micro-batch accumulation equals the one-batch gradient."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    return metaste.quantize_model(net, bits=2, surrogate=surrogate, quantizer=quantizer)


def images(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def closure_for(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def fogzo(model, **kw):
    kw.setdefault("total_steps", 100)
    return metaste.FOGZO(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kw)


def hyper(model, method="analytical", **kw):
    momentum = 0.0 if method == "analytical" else 0.9
    return metaste.HyperSTE(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), method=method, **kw
    )


def capture(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Deep copies of the weights, buffers and the optimizer's whole state_dict (base + wrapper)."""
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
    }


def same(a: Any, b: Any) -> bool:
    """Structural equality with ``torch.equal`` on tensors (NaN-free values)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_untouched(before: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer) -> None:
    after = capture(model, opt)
    for part in ("params", "buffers", "opt"):
        assert same(before[part], after[part]), f"{part} changed"
