"""``method="analytical"``: the self-consistent SLSTE update of thesis 4.1/4.3/4.6.1
(docs/design.md §3.1).

The math is the plain function :func:`analytical_update`; :class:`Analytical` holds the options
and :class:`AnalyticalMethod` the bookkeeping (history g⁻, d⁻, η_w; diagnostics) around it. d⁻ is
kept as a one-byte region code (:func:`slste_grad_code`) and rebuilt from it and a.

Size: ~470 lines, over the ~400 the package aims for, on purpose: one algorithm, with its eager
path beside the compiled passes that must give the same bits (the region front, the gap halving,
the back pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ...quant.surrogates import slste, slste_grad_code, slste_grad_from_code
from .._closure import Closure
from .._fused import FUSE_MIN, kernel
from .._fused import host_floats as _host_floats
from ._common import Evaluate, HyperMethod, ManagedWeight
from ._options import MethodOptions

__all__ = [
    "Analytical",
    "AnalyticalMethod",
    "analytical_update",
    "AnalyticalResult",
    "REGIONS",
    "RESOLVES",
    "slste_grad_code",
    "slste_grad_from_code",
]

REGIONS = ("unique_identity", "unique_scaling", "overlap", "gap")
RESOLVES = ("halve", "threshold", "passive")


class AnalyticalResult(NamedTuple):
    a: Tensor  # a' before clamping
    regions: dict[str, Tensor]  # boolean masks, one per name in REGIONS (a partition)
    halvings: Tensor  # m per element (0 where η_a was not halved)
    unresolved: Tensor  # boolean: gap elements past max_halvings (a' = a)


def analytical_update(
    a: Tensor, u: Tensor, c: Tensor, eta_a: float, qn: float, qp: float, resolve: str, max_halvings: int
) -> AnalyticalResult:
    """a' solving a' = a + η_a·c·ψ(u; a') element-wise (SLSTE, docs/design.md §3.1).

    r = 1 − a·u/Qp (u > 0), 1 + a·u/Qn (u < 0), 1 (u = 0); x = η_a·c.
    identity a' = a is legal iff r ≤ 0; scaling a' = a/(1 − x) is legal iff x < r.
    Regions: unique identity (r ≤ 0, x ≥ r), unique scaling (r > 0, x < r), overlap (r ≤ 0,
    x < r), gap (r > 0, x ≥ r). ``resolve``:

    * ``"halve"``: overlap → identity; gap → scaling with x·2^−m, m ≥ 1 the smallest integer with
      x·2^−m < r; past ``max_halvings`` a' = a.
    * ``"threshold"``: identity iff r ≤ 0, else scaling with the full x; where 1 − x ≤ 0, the
      ``"halve"`` result. (The thesis writes r < 0; r = 0 is "clipped" by the edge rule of
      docs/design.md §3.1, and with ≤ the three modes agree everywhere except the gap.)
    * ``"passive"``: identity in overlap and gap.
    """
    # Memory: a handful of weight-sized temporaries at a time, in place where the
    # value is the same bitwise (1 − y = −y + 1; a/(1 − x) written into the 1 − x buffer);
    # halvings / unresolved are expanded zeros unless some element is in the gap. A large tensor
    # runs the element-wise front as one compiled pass (the same values, :func:`_front`).
    if a.numel() >= FUSE_MIN and a.shape == u.shape == c.shape:
        eta = torch.tensor(eta_a, dtype=c.dtype, device=c.device)  # a tensor: one kernel for every η_a
        x, r, scaled, _ = kernel(_front, "analytical", True)(a, u, c, eta, float(qn), float(qp))
        regions = _regions(x, r)  # eager: inductor's bool stores are slow on CPU (8 ms here)
        if resolve == "threshold":  # _front gave a/(1 − x) on the unique-scaling region only
            scaled = torch.div(a, x.neg().add_(1))
    else:
        x, r, regions, scaled = _front_eager(a, u, c, eta_a, qn, qp)
    gi = regions["gap"].nonzero(as_tuple=True)
    has_gap = gi[0].numel() > 0
    halvings = torch.zeros_like(a) if has_gap else a.new_zeros(()).expand_as(a)
    unresolved = (
        torch.zeros_like(r, dtype=torch.bool) if has_gap else r.new_zeros((), dtype=torch.bool).expand_as(r)
    )
    if has_gap:
        a_gap, m, bad = _gap(x[gi], r[gi], a[gi], max_halvings)
    del r
    if resolve == "halve":
        a_new = torch.where(regions["unique_scaling"], scaled, a, out=scaled)
        if has_gap:
            a_new[gi] = a_gap
            halvings[gi] = torch.where(bad, 0.0, m)
            unresolved[gi] = bad
    elif resolve == "threshold":
        a_halve = torch.where(regions["unique_scaling"], scaled, a)
        if has_gap:
            a_halve[gi] = a_gap
        clipped = regions["unique_identity"] | regions["overlap"]
        fallback = (1 - x <= 0).logical_and_(~clipped)  # scaling with the full x would flip a's sign
        a_new = torch.where(clipped, a, torch.where(fallback, a_halve, scaled))
        if has_gap:
            use = fallback[gi]
            halvings[gi] = torch.where(use & ~bad, m, 0.0)
            unresolved[gi] = use & bad
    else:  # "passive"
        a_new = torch.where(regions["unique_scaling"], scaled, a, out=scaled)
    return AnalyticalResult(a_new, regions, halvings, unresolved)


def _gap(xg: Tensor, rg: Tensor, ag: Tensor, max_halvings: int) -> tuple[Tensor, Tensor, Tensor]:
    """The gap elements (x ≥ r > 0; usually a small fraction, so computed on them only): a′ with
    the halving count m and the elements past ``max_halvings`` (``bad``: a′ = a)."""
    cap = max_halvings + 1
    m = (torch.floor(torch.log2(xg / rg)) + 1).clamp(1, cap)  # smallest m with x·2^−m < r ...
    m = torch.where(torch.ldexp(xg, -m) >= rg, (m + 1).clamp(max=cap), m)  # ... if log2 rounded down
    m = torch.where((m > 1) & (torch.ldexp(xg, 1 - m) < rg), m - 1, m)  # ... or up
    # ldexp scales by an exact power of two: x·2^−m carries no rounding of its own
    xm = torch.ldexp(xg, -m)
    bad = (m > max_halvings) | (xm >= rg)
    return torch.where(bad, ag, ag / (1 - xm)), m, bad


def _update_counts(
    a: Tensor, u: Tensor, c: Tensor, eta_a: float, qn: float, qp: float, resolve: str, max_halvings: int
) -> tuple[Tensor, list[float], tuple[float, float, float]]:
    """:func:`analytical_update` for ``resolve`` "halve" / "passive" on a large tensor, without the
    region masks: one compiled pass gives x, r, a′ off the gap and the four region
    counts; only a step with gap elements finds them (eagerly) and halves them. Returns (a′ before
    clamping, the counts in :data:`REGIONS` order, (Σ halvings, #halved, #unresolved)): the values
    of :func:`analytical_update`."""
    eta = torch.tensor(eta_a, dtype=c.dtype, device=c.device)
    counts_t = kernel(_front_count_only, "analytical", True)(a, u, c, eta, float(qn), float(qp))
    counts = [float(k) for k in counts_t.tolist()]
    halv = (0.0, 0.0, 0.0)
    gap = bool(counts[3]) and resolve == "halve"
    if not gap:  # a′ without x and r: two weight copies less
        a_new = kernel(_front_a, "analytical", True)(a, u, c, eta, float(qn), float(qp))
    else:  # the gap: x ≥ r > 0 (NaN counts as there, as in _regions); x and r only here
        x, r, a_new, _ = kernel(_front, "analytical", True)(a, u, c, eta, float(qn), float(qp))
        gi = (x < r).logical_not_().logical_and_((r <= 0).logical_not_()).nonzero(as_tuple=True)
        a_gap, m, bad = _gap(x[gi], r[gi], a[gi], max_halvings)
        a_new[gi] = a_gap
        unresolved = float(bad.sum())
        halv = (float(torch.where(bad, 0.0, m).sum()), float(bad.numel()) - unresolved, unresolved)
    return a_new, counts, halv


def _front_eager(a: Tensor, u: Tensor, c: Tensor, eta_a: float, qn: float, qp: float) -> tuple:
    """x, r, the four regions and a/(1 − x), eagerly with few temporaries (in place where the value
    is the same bitwise: 1 − y = −y + 1)."""
    x = c * eta_a
    t = torch.mul(a, u)  # a·u
    r = torch.div(t, qp).neg_().add_(1)  # u > 0: 1 − a·u/Qp is the smaller one; u < 0: 1 + a·u/Qn
    torch.minimum(r, t.div_(qn).add_(1), out=r)  # u = 0: both are 1
    del t
    regions = _regions(x, r)
    return x, r, regions, torch.div(a, x.neg().add_(1))  # a / (1 − x)


def _regions(x: Tensor, r: Tensor) -> dict[str, Tensor]:
    """The four regions (a partition; r = 0 counts as clipped, docs/design.md §3.1)."""
    clipped = r <= 0
    legal = x < r
    unclipped, illegal = ~clipped, ~legal
    return {
        "unique_identity": clipped & illegal,
        "unique_scaling": unclipped & legal,
        "overlap": clipped.logical_and_(legal),
        "gap": illegal.logical_and_(unclipped),
    }


def _front(a: Tensor, u: Tensor, c: Tensor, eta: Tensor, qn: float, qp: float) -> tuple:
    """x, r, a/(1 − x) on the unique-scaling region and a elsewhere (the "halve"/"passive" a′ off
    the gap), and the element count of each region (int64, :data:`REGIONS` order), in functional
    form for ``torch.compile``: one pass over a, u, c (the operations of :func:`_front_eager` and
    :func:`_regions`, the same values)."""
    x = c * eta
    au = a * u
    r = torch.minimum(-(au / qp) + 1, au / qn + 1)
    clipped, legal = r <= 0, x < r
    scaling = ~clipped & legal
    counts = torch.stack(
        [(clipped & ~legal).sum(), scaling.sum(), (clipped & legal).sum(), (~clipped & ~legal).sum()]
    )
    return x, r, torch.where(scaling, a / (-x + 1), a), counts


def _front_counts(a: Tensor, u: Tensor, c: Tensor, eta: Tensor, qn: float, qp: float) -> tuple:
    """:func:`_front` without x and r (the same a′ and counts; two weight copies less
    when no element is in the gap), as two compiled passes: one kernel for both would store the
    scaling mask as bools, which inductor does slowly on CPU."""
    counts = kernel(_front_count_only, "analytical", True)(a, u, c, eta, qn, qp)
    return kernel(_front_a, "analytical", True)(a, u, c, eta, qn, qp), counts


def _front_count_only(a: Tensor, u: Tensor, c: Tensor, eta: Tensor, qn: float, qp: float) -> Tensor:
    """The region counts of :func:`_front` (the same expressions)."""
    x = c * eta
    au = a * u
    r = torch.minimum(-(au / qp) + 1, au / qn + 1)
    clipped, legal = r <= 0, x < r
    scaling = ~clipped & legal
    return torch.stack(
        [(clipped & ~legal).sum(), scaling.sum(), (clipped & legal).sum(), (~clipped & ~legal).sum()]
    )


def _front_a(a: Tensor, u: Tensor, c: Tensor, eta: Tensor, qn: float, qp: float) -> Tensor:
    """The a′ of :func:`_front` (the same expressions)."""
    x = c * eta
    au = a * u
    r = torch.minimum(-(au / qp) + 1, au / qn + 1)
    return torch.where(~(r <= 0) & (x < r), a / (-x + 1), a)


def _history_product(g: Tensor, lr: Tensor, g_prev: Tensor, d_prev: Tensor) -> Tensor:
    """c = η_w⁻·g·g⁻·d⁻ for ``torch.compile``: one pass, the products of the eager path in its order
    (a history with a full d⁻: an old checkpoint's)."""
    return ((g * lr) * g_prev) * d_prev


def _history_product_code(
    g: Tensor, lr: Tensor, g_prev: Tensor, code: Tensor, a: Tensor, window: bool, b: float
) -> Tensor:
    """:func:`_history_product` with d⁻ rebuilt from its region code and a (the expressions of
    :func:`_back`, so the same d⁻ bit for bit)."""
    inside = (code & 1).to(g.dtype)
    d = inside
    if window:
        d = inside - (a / (2 * b)) * (code >> 1).to(g.dtype)
    return ((g * lr) * g_prev) * d


def _back(
    u: Tensor, a: Tensor, a_new: Tensor, g: Tensor, c: Tensor, qn: float, qp: float, window: bool, b: float,
    a_min: float, a_max: float,
) -> tuple:  # fmt: skip
    """After a′: clamp(a′) written into ``a_new`` (θ itself is written after the base step), the new
    gradient g·ψ(u; a′) written into ``c``'s buffer, the history's region code of
    d = ∂ψ(u; a′)/∂a (:func:`slste_grad_code`), the count of ψ ≠ 0 and Σ(c·ψ)², in one pass for
    ``torch.compile`` (the element-wise values are those of the eager path; the two sums may round
    differently). In place: two weight copies less at the step's peak. ``a`` is unused
    (the signature of the kernel)."""
    a = a_new.clamp(a_min, a_max)
    a_new.copy_(a)
    au = a * u
    inside = (torch.clamp(au, -qn, qp) == au).to(u.dtype)  # band(a·u)
    psi = inside * a
    cp = c * psi
    code = inside  # formed in floats, then one conversion: inductor's bool/uint8 ops are slow on CPU
    if window:
        tau = torch.where(u > 0, qp, -qn).to(u.dtype) / u
        code = inside + 2 * ((tau - a).abs() < b).to(u.dtype)
    code = code.to(torch.uint8)
    nnz, sq = (psi != 0).sum(), (cp * cp).sum()
    c.copy_(psi * g)
    return code, nnz, sq


@dataclass(frozen=True)
class Analytical(MethodOptions):
    """Options of ``method="analytical"`` (docs/design.md §3.1, thesis 4.3): the self-consistent
    per-element update a' = a + η_a·c·ψ(u_t; a'), one forward+backward per step. Needs
    ``torch.optim.SGD`` without momentum/nesterov/maximize (weight decay is fine) and SLSTE with
    ``granularity="element"``. Common options: :class:`~metaste.optim.hyper._options.MethodOptions`
    (``boundary`` defaults to ``"window"``, the thesis's b = ½).

    Args:
        resolve: ``"halve"`` (default), ``"threshold"`` or ``"passive"``: how overlap and gap
            elements are resolved (:func:`analytical_update`).
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
            if s.name != "slste" or s.granularity != "element":
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
        o = self.opts
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
            s, a, u = mw.surrogate, mw.theta()[0], mw.u()
            hist = self.history[i]
            # c = η_w⁻·g·g⁻·d⁻, in one buffer (the same products in the same order)
            fast = g.numel() >= FUSE_MIN and g.shape == u.shape == a.shape  # compiled passes, the same values
            window = s.boundary == "window"
            if hist is None:
                c = torch.zeros_like(g)
            elif fast and hist[0].shape == hist[1].shape == g.shape:  # one compiled pass
                lr = torch.tensor(hist[2], dtype=g.dtype, device=g.device)
                if hist[1].dtype == torch.uint8:
                    c = kernel(_history_product_code, "analytical", True)(
                        g, lr, hist[0], hist[1], a, window, float(s.b)
                    )
                else:
                    c = kernel(_history_product, "analytical", True)(g, lr, hist[0], hist[1])
            else:
                d_prev = hist[1]
                if d_prev.dtype == torch.uint8:
                    d_prev = slste_grad_from_code(d_prev, a, s.boundary, s.b)
                c = torch.mul(g, hist[2]).mul_(hist[0]).mul_(d_prev)
                del d_prev
            # g⁻ and d⁻ are spent: drop them now, not after the new ones exist (two weight copies
            # less at this step's peak; the history is rebuilt below before anything can raise)
            self.history[i] = hist = None
            # counts over the rank's elements (summed over the shards below): regions, halvings
            if fast and o.resolve != "threshold":  # no region masks: their counts
                a_new, counts, halv = _update_counts(
                    a, u, c, self.hyper_lr(i, c), mw.qn, mw.qp, o.resolve, o.max_halvings
                )
                counts += list(halv)
            else:
                res = analytical_update(a, u, c, self.hyper_lr(i, c), mw.qn, mw.qp, o.resolve, o.max_halvings)
                a_new = res.a
                counts = [float(res.regions[k].count_nonzero()) for k in REGIONS]
                if counts[REGIONS.index("gap")] == 0:  # no gap element: nothing halved or unresolved
                    counts += [0.0, 0.0, 0.0]
                else:
                    counts += [
                        float(res.halvings.sum()),
                        float((res.halvings > 0).sum()),
                        float(res.unresolved.sum()),
                    ]
                del res
            if fast:  # clamp(a′) and the back pass in one compiled pass
                d, nnz, sq = kernel(_back, "analytical", True)(
                    u, a, a_new, g, c, float(mw.qn), float(mw.qp), window, float(s.b),
                    float(s.a_min), float(s.a_max),
                )  # fmt: skip
                nnz, sq = _host_floats([nnz, sq])
                grad = c  # g·ψ, written into c's buffer
            else:
                a_new.clamp_(s.a_min, s.a_max)  # a′ clamped
                psi = slste(u, a_new, mw.qn, mw.qp)
                nnz = float(psi.count_nonzero())
                sq = float(torch.linalg.vector_norm(c.mul_(psi))) ** 2  # ∂L_t/∂a = −c·ψ(u_t; a')
                grad = psi.mul_(g)  # g·ψ, in ψ's buffer
                d = slste_grad_code(u, a_new, mw.qn, mw.qp, s.boundary, s.b)
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


Analytical.runtime = AnalyticalMethod
