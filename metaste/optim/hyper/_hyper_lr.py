"""The surrogate learning rate η_a of HyperSTE (docs/design.md §3.5): :class:`HyperLR`, one per
surrogate-parameter tensor, either ``hyper_lr`` itself (``"raw"``) or ``hyper_lr`` / RMS of the
hypergradient (``"normalized"``, a bias-corrected moving average of its mean square).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.fsdp import all_reduce_sums

__all__ = ["HyperLR"]


class HyperLR:
    """The surrogate learning rate η_a, one per surrogate-parameter tensor (docs/design.md §3.5).

    ``"raw"``: η_a = ``hyper_lr``. ``"normalized"``: η_a = ``hyper_lr`` / RMS, with RMS² a
    bias-corrected exponential moving average (factor ``beta``) of the mean square of the
    hypergradient's entries, this step's included. Then η_a·(hypergradient) has an RMS of about
    ``hyper_lr``: with a ≈ 1, a moves by about ``hyper_lr`` per update, whatever the model, loss
    scale or learning rate (elements with a zero hypergradient, e.g. clipped ones, count in the
    mean: the others move a little more). Until a tensor has seen a nonzero hypergradient its
    η_a is 0 (there is nothing to move it by).
    """

    def __init__(self, hyper_lr: float, mode: str, beta: float, n: int, groups: Sequence[Any] = ()) -> None:
        self.hyper_lr, self.mode, self.beta = hyper_lr, mode, beta
        self.ema = [0.0] * n
        self.count = [0] * n
        # FSDP2: the process group over which tensor i is sharded (its mean square sums over it)
        self.groups = list(groups) or [None] * n

    def __call__(self, i: int, h: Tensor) -> float:
        """η_a for tensor ``i`` given this update's hypergradient ``h`` (the rank's rows of it
        when tensor ``i`` is sharded)."""
        if self.mode == "raw":
            return self.hyper_lr
        sq, n = float(torch.linalg.vector_norm(h)) ** 2, h.numel()
        if self.groups[i] is not None:
            sq, n = all_reduce_sums([sq, n], self.groups[i], h.device)
        mean_sq = sq / n
        if mean_sq > 0:
            self.ema[i] = self.beta * self.ema[i] + (1 - self.beta) * mean_sq
            self.count[i] += 1
        if self.count[i] == 0:
            return 0.0
        rms = math.sqrt(self.ema[i] / (1 - self.beta ** self.count[i]))  # Adam-style bias correction
        return self.hyper_lr / rms if rms > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"ema": list(self.ema), "count": list(self.count)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.ema, self.count = list(sd["ema"]), list(sd["count"])
