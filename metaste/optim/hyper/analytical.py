"""``method="analytical"``: the self-consistent SLSTE update of thesis 4.1/4.3/4.6.1
(docs/design.md §3.1).

The math is the plain function :func:`~.analytical_math.analytical_update` and its compiled passes
(:mod:`.analytical_math`); :class:`Analytical` holds the options and :class:`AnalyticalMethod` the
bookkeeping (history g⁻, d⁻, η_w; diagnostics) around it. d⁻ is kept as a one-byte region code
(:func:`slste_grad_code`) and rebuilt from it and a.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..._compile import FUSE_MIN, kernel
from ...quant.learnable import SLSTE
from ...quant.psi import slste, slste_grad_code, slste_grad_from_code
from ..core.closure import Closure
from ..core.host import host_floats as _host_floats
from ._common import Evaluate, HyperMethod, ManagedWeight
from ._options import MethodOptions, runs
from .analytical_math import (
    REGIONS,
    _back,
    _history_product,
    _history_product_code,
    _update_counts,
    analytical_update,
)

__all__ = [
    "Analytical",
    "AnalyticalMethod",
    "RESOLVES",
    "slste_grad_code",
    "slste_grad_from_code",
]

RESOLVES = ("halve", "threshold", "passive")


@dataclass(frozen=True)
class Analytical(MethodOptions):
    """Options of ``method="analytical"`` (docs/design.md §3.1, thesis 4.3): the self-consistent
    per-element update a' = a + η_a·c·ψ(u_t; a'), one forward+backward per step. Needs
    ``torch.optim.SGD`` without momentum/nesterov/maximize (weight decay is fine) and SLSTE with
    ``granularity="element"``. Common options: :class:`~metaste.optim.hyper._options.MethodOptions`
    (``boundary`` defaults to ``"window"``, the thesis's b = ½).

    Args:
        resolve: ``"halve"`` (default), ``"threshold"`` or ``"passive"``: how overlap and gap
            elements are resolved (:func:`~.analytical_math.analytical_update`).
        max_halvings: ``"halve"``: past this many halvings of η_a a gap element is not updated
            (default 30).
    """

    name = "analytical"
    default_boundary = "window"

    resolve: str = "halve"
    max_halvings: int = 30

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolve not in RESOLVES:
            raise ValueError(f"Invalid resolve: {self.resolve!r}; choose 'halve', 'threshold' or 'passive'")
        m = self.max_halvings
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"Invalid max_halvings: {m!r}; it must be an int >= 0")

    def check(self, optimizer: Optimizer, managed: list[ManagedWeight], model: nn.Module | None) -> None:
        hint = 'use method="delayed", which works with any torch.optim optimizer'
        if not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(
                f"method='analytical' needs torch.optim.SGD (its update rule is derived for plain "
                f"SGD), got {type(optimizer).__name__}; {hint}"
            )
        self.check_groups(optimizer)
        for mw in managed:
            s = mw.surrogate
            if not isinstance(s, SLSTE) or s.granularity != "element":
                raise ValueError(
                    f"method='analytical' supports only SLSTE with granularity='element' (its branch "
                    f"rule is per element); weight {mw.name!r} has surrogate {s.name!r} with "
                    f"granularity={s.granularity!r}. Quantize with surrogate='slste', "
                    f"granularity='element', or {hint}"
                )

    @staticmethod
    def check_groups(optimizer: Optimizer) -> None:
        """The group settings the update rule needs; checked at construction and at every step
        (a group's momentum can be switched on later)."""
        hint = 'use method="delayed", which works with any torch.optim optimizer'
        for i, g in enumerate(optimizer.param_groups):
            if g["momentum"] != 0 or g["nesterov"] or g["maximize"]:
                raise ValueError(
                    f"method='analytical' needs SGD without momentum, nesterov or maximize; param "
                    f"group {i} has momentum={g['momentum']}, nesterov={g['nesterov']}, "
                    f"maximize={g['maximize']}; set momentum=0 or {hint}"
                )


@runs(Analytical)
class AnalyticalMethod(HyperMethod):
    """Per step, on the complete ∂L_t/∂v̂_t = g (docs/design.md §3.1)::

    c  = η_w⁻ · g · g⁻ · d⁻          (0 on the first step: no history)
    a' = clamp(analytical_update(a, u_t, c, η_a), a_min, a_max)
    p.grad = g · ψ(u_t; a')          (the base SGD step uses this)
    g⁻, d⁻, η_w⁻ ← g, ∂ψ(u_t; a')/∂a, the lr of this step's update
    a ← a'                           (after the base step: a step that raises leaves a as it was)

    d⁻ is kept as its region code (:func:`slste_grad_code`) and rebuilt with a (= a' until the next
    step; θ changed from outside between two steps changes the rebuilt d⁻ too). ``state_dict``
    saves the full d⁻, as before; a loaded full d⁻ is used as it is.
    """

    opts: Analytical
    writes_theta_last = True  # a ← a' in after_update

    def __init__(
        self, optimizer: Optimizer, managed: list[ManagedWeight], opts: Analytical, model: nn.Module | None
    ) -> None:
        super().__init__(optimizer, managed, opts, model)
        # history per managed weight: (g⁻, d⁻ as its uint8 region code or in full, η_w⁻) or None
        # before the first step
        self.history: list[tuple[Tensor, Tensor, float] | None] = [None] * len(managed)
        self.a_new: list[tuple[Tensor, Tensor]] = []  # (a, clamped a') until after the base step

    def step(self, closure: Closure | None, evaluate: Evaluate, t: int) -> Tensor:
        Analytical.check_groups(self.optimizer)  # before anything runs
        return super().step(closure, evaluate, t)

    def before_update(self, step: int) -> None:
        # the groups of now: load_state_dict replaces the group dicts (an LR scheduler's lr)
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        self.step_stats = {}
        sq_norm = 0.0
        new_a: list[tuple[Tensor, Tensor]] = []
        self.a_new = []
        for i, mw in enumerate(self.managed):
            g = mw.local_grad()  # FSDP2: g, u, a, c and the history are the rank's rows
            if g is None:  # weight not used by this loss: the base optimizer skips it too
                continue
            a, u = mw.theta()[0], mw.u()
            fast = g.numel() >= FUSE_MIN and g.shape == u.shape == a.shape  # compiled passes, the same values
            c = self._history_product(i, mw, g, a, fast)
            # g⁻ and d⁻ are spent: drop them now, not after the new ones exist (two weight copies
            # less at this step's peak; the history is rebuilt below before anything can raise)
            self.history[i] = None
            a_new, counts = self._solve(i, mw, a, u, c, fast)
            grad, d, nnz, sq = self._back(mw, g, a, u, c, a_new, fast)
            del c, u
            n, *counts, nnz, sq = mw.sum_over_shards([g.numel(), *counts, nnz, sq], g.device)
            stats = {k: x / n for k, x in zip(REGIONS, counts)}
            stats.update(halvings=counts[4], halved_frac=counts[5] / n, unresolved_frac=counts[6] / n)
            stats["clipped_frac"] = (n - nnz) / n
            sq_norm += sq
            mw.set_grad(grad)
            self.history[i] = (g, d, float(group_of[id(mw.param)]["lr"]))
            new_a.append((a, a_new))
            self.step_stats[mw.name] = stats
        self.hypergrad_norm = sq_norm**0.5
        self.a_new = new_a

    def _history_product(self, i: int, mw: ManagedWeight, g: Tensor, a: Tensor, fast: bool) -> Tensor:
        """c = η_w⁻·g·g⁻·d⁻ of weight i, in one buffer (the same products in the same order; 0 at
        its first step)."""
        hist, s = self.history[i], mw.surrogate
        if hist is None:
            return torch.zeros_like(g)
        if fast and hist[0].shape == hist[1].shape == g.shape:  # one compiled pass
            lr = torch.tensor(hist[2], dtype=g.dtype, device=g.device)
            if hist[1].dtype == torch.uint8:
                return kernel(_history_product_code, "analytical", True)(
                    g, lr, hist[0], hist[1], a, s.boundary == "window", float(s.b)
                )
            return kernel(_history_product, "analytical", True)(g, lr, hist[0], hist[1])
        d_prev = hist[1]
        if d_prev.dtype == torch.uint8:
            d_prev = slste_grad_from_code(d_prev, a, s.boundary, s.b)
        return torch.mul(g, hist[2]).mul_(hist[0]).mul_(d_prev)

    def _solve(
        self, i: int, mw: ManagedWeight, a: Tensor, u: Tensor, c: Tensor, fast: bool
    ) -> tuple[Tensor, list[float]]:
        """a′ of the self-consistent update and the counts over the rank's elements: each region's,
        then the halvings, the halved and the unresolved elements."""
        o = self.opts
        if fast and o.resolve != "threshold":  # no region masks: their counts
            a_new, counts, halv = _update_counts(
                a, u, c, self.hyper_lr(i, c), mw.qn, mw.qp, o.resolve, o.max_halvings
            )
            return a_new, counts + list(halv)
        res = analytical_update(a, u, c, self.hyper_lr(i, c), mw.qn, mw.qp, o.resolve, o.max_halvings)
        counts = [float(res.regions[k].count_nonzero()) for k in REGIONS]
        if counts[REGIONS.index("gap")] == 0:  # no gap element: nothing halved or unresolved
            return res.a, counts + [0.0, 0.0, 0.0]
        return res.a, counts + [
            float(res.halvings.sum()),
            float((res.halvings > 0).sum()),
            float(res.unresolved.sum()),
        ]

    def _back(
        self, mw: ManagedWeight, g: Tensor, a: Tensor, u: Tensor, c: Tensor, a_new: Tensor, fast: bool
    ) -> tuple[Tensor, Tensor, float, float]:
        """a′ clamped in place, and (g·ψ(u; a′), the code of ∂ψ/∂a for the next step, the count of
        ψ ≠ 0, ‖c·ψ‖²); g·ψ is written into c's buffer or ψ's."""
        s = mw.surrogate
        if fast:  # clamp(a′) and the back pass in one compiled pass
            d, nnz, sq = kernel(_back, "analytical", True)(
                u, a, a_new, g, c, float(mw.qn), float(mw.qp), s.boundary == "window", float(s.b),
                float(s.a_min), float(s.a_max),
            )  # fmt: skip
            nnz, sq = _host_floats([nnz, sq])
            return c, d, nnz, sq  # g·ψ, written into c's buffer
        a_new.clamp_(s.a_min, s.a_max)  # a′ clamped
        psi = slste(u, a_new, mw.qn, mw.qp)
        nnz = float(psi.count_nonzero())
        sq = float(torch.linalg.vector_norm(c.mul_(psi))) ** 2  # ∂L_t/∂a = −c·ψ(u_t; a')
        grad = psi.mul_(g)  # g·ψ, in ψ's buffer
        return grad, slste_grad_code(u, a_new, mw.qn, mw.qp, s.boundary, s.b), nnz, sq

    def after_update(self, step: int) -> None:
        """a ← a′, now that the base step is done."""
        with torch.no_grad():
            for a, a_new in self.a_new:
                a.copy_(a_new)
        self.a_new = []

    def diagnostics(self) -> dict[str, Any]:
        """``branch_fractions``: the region fractions over all elements of the last step."""
        sizes = {mw.name: mw.param.numel() for mw in self.managed if mw.name in self.step_stats}
        total = sum(sizes.values()) or 1
        return {
            "branch_fractions": {
                r: sum(self.step_stats[n][r] * sz for n, sz in sizes.items()) / total for r in REGIONS
            }
        }

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["history"] = [
            None if h is None else {"g": h[0], "d": self._full_d(i, h[1]), "lr": h[2]}
            for i, h in enumerate(self.history)
        ]
        return sd

    def _full_d(self, i: int, d: Tensor) -> Tensor:
        """d⁻ of weight ``i`` in full (the checkpoint's format): rebuilt from its region code."""
        if d.dtype != torch.uint8:
            return d
        s = self.managed[i].surrogate
        return slste_grad_from_code(d, self.managed[i].theta()[0], s.boundary, s.b)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.history = [None if h is None else (h["g"], h["d"], h["lr"]) for h in sd["history"]]
