"""What every HyperSTE method shares (SPEC §3): the managed weights, the hyper learning rate
(raw or normalised), the method interface, and the surrogate statistics of the diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...quant.registry import QuantEntry

__all__ = ["ManagedWeight", "HyperOptions", "HyperLR", "HyperMethod", "surrogate_stats"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HIST_BINS = 20


@dataclass(frozen=True, eq=False)
class ManagedWeight(QuantEntry):
    """A quantized weight whose learnable surrogate HyperSTE trains: its registry entry
    (``qn``, ``qp``, ``surrogate``, ``u()`` — u = v/s now, detached: in ``step`` the u of the
    forward that made the grad) plus a name for the diagnostics."""

    name: str = ""

    @property
    def param(self) -> nn.Parameter:
        return self.weight


@dataclass(frozen=True)
class HyperOptions:
    """The validated keyword arguments of :class:`~metaste.optim.hyperste.HyperSTE`."""

    hyper_lr: float
    hyper_lr_mode: str
    normalize_beta: float
    hyper_optimizer: Any
    hyper_optimizer_kwargs: dict
    window: int
    accumulate: str
    resolve: str
    max_halvings: int


class HyperLR:
    """The surrogate learning rate η_a, one per surrogate-parameter tensor.

    ``"raw"``: η_a = ``hyper_lr``. ``"normalized"``: η_a = ``hyper_lr`` / RMS, with RMS² a
    bias-corrected exponential moving average (factor ``beta``) of the mean square of the
    hypergradient's entries, this step's included. Then η_a·(hypergradient) has an RMS of about
    ``hyper_lr``: with a ≈ 1, a moves by about ``hyper_lr`` per update, whatever the model, loss
    scale or learning rate (elements with a zero hypergradient, e.g. clipped ones, count in the
    mean: the others move a little more). Until a tensor has seen a nonzero hypergradient its
    η_a is 0 (there is nothing to move it by).
    """

    def __init__(self, hyper_lr: float, mode: str, beta: float, n: int) -> None:
        self.hyper_lr, self.mode, self.beta = hyper_lr, mode, beta
        self.ema = [0.0] * n
        self.count = [0] * n

    def __call__(self, i: int, h: Tensor) -> float:
        """η_a for tensor ``i`` given this update's hypergradient ``h``."""
        if self.mode == "raw":
            return self.hyper_lr
        mean_sq = float(torch.linalg.vector_norm(h)) ** 2 / h.numel()
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


class HyperMethod:
    """Interface of a HyperSTE method; :class:`~metaste.optim.hyperste.HyperSTE` calls, per step:
    closure + backward (managed weights get the raw ∂L/∂v̂), :meth:`before_update` (must turn
    each managed ``p.grad`` into the surrogate gradient), the base ``optimizer.step()``, then
    :meth:`after_update`. New methods (SPEC §3.3–3.4) subclass this and register in
    ``HyperSTE.METHODS``.
    """

    name: ClassVar[str]
    default_boundary: ClassVar[str]

    def __init__(self, optimizer: Optimizer, managed: list[ManagedWeight], opts: HyperOptions) -> None:
        self.optimizer, self.managed, self.opts = optimizer, managed, opts
        self.tensors = [t for mw in managed for t in mw.surrogate.params()]
        self.hyper_lr = HyperLR(opts.hyper_lr, opts.hyper_lr_mode, opts.normalize_beta, len(self.tensors))
        # per-step scalars for the diagnostics, filled by the method: {layer name: {key: value}}
        self.step_stats: dict[str, dict[str, float]] = {}
        self.hypergrad_norm = 0.0

    @classmethod
    def check(cls, optimizer: Optimizer, managed: list[ManagedWeight], opts: HyperOptions) -> None:
        """Raise a clear error if the method cannot run on this optimizer / these weights."""

    def before_update(self, step: int) -> None:
        raise NotImplementedError

    def after_update(self, step: int) -> None:
        """Hook after the base optimizer's step (default: nothing)."""

    def state_dict(self) -> dict[str, Any]:
        return {"hyper_lr": self.hyper_lr.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.hyper_lr.load_state_dict(sd["hyper_lr"])


def surrogate_stats(t: Tensor, a_min: float, a_max: float) -> dict[str, Any]:
    """mean / min / max / quantiles / histogram over [a_min, a_max] / fraction at each clamp."""
    flat = t.detach().flatten().double()
    srt = flat.sort().values
    n = srt.numel()
    stats: dict[str, Any] = {
        "mean": float(flat.mean()),
        "min": float(srt[0]),
        "max": float(srt[-1]),
        "frac_at_min": float((flat <= a_min).double().mean()),
        "frac_at_max": float((flat >= a_max).double().mean()),
    }
    for q in QUANTILES:
        stats[f"q{round(q * 100):02d}"] = float(srt[min(n - 1, round(q * (n - 1)))])
    counts = torch.histc(flat, bins=HIST_BINS, min=a_min, max=a_max)
    stats["hist"] = {"counts": counts.long().tolist(), "range": (a_min, a_max)}
    return stats
