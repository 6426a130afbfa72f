"""What the integration tests share: small quantized models, data, and comparisons."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import metaste


def mlp(seed: int = 0, surrogate: str = "slste", bits: int = 2, **kw) -> nn.Module:
    """A 10-16-16-3 MLP with its two hidden layers quantized (the last one stays float)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return metaste.quantize_model(net, bits=bits, surrogate=surrogate, **kw)


def batches(n: int, seed: int = 1, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 10, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (surrogate parameters included), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def nested_equal(a, b) -> bool:
    """Structural equality of (nested) state dicts with tensors compared bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b
