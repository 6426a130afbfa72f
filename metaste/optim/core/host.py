"""Device scalars read on the host in one transfer (one synchronisation instead of one per
scalar)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["host_floats"]


def host_floats(xs: list[Tensor]) -> list[float]:
    """0-dim tensors as Python floats in one host transfer (exact: float64 holds every float32)."""
    dev = xs[0].device
    return torch.stack([x.to(device=dev, dtype=torch.float64) for x in xs]).tolist()
