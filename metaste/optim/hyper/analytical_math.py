"""The per-element math of ``method="analytical"`` (docs/design.md §3.1, thesis 4.1/4.3/4.6.1):
:func:`analytical_update` solves the self-consistent SLSTE update a' = a + η_a·c·ψ(u; a') element
by element (the four regions of r and x = η_a·c, and how overlap and gap are resolved), with its
eager path beside the compiled passes that give the same bits: the region front, the gap halving,
the history product c = η_w⁻·g·g⁻·d⁻ and the back pass after a'. The method object that calls
them is :class:`~.analytical.AnalyticalMethod`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..._compile import FUSE_MIN, kernel

__all__ = ["AnalyticalResult", "REGIONS", "analytical_update"]


REGIONS = ("unique_identity", "unique_scaling", "overlap", "gap")


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
