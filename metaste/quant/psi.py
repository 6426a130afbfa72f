"""Every surrogate gradient ψ(u; θ) of docs/design.md §2 and its exact ∂ψ/∂a, as plain functions.

``u = v / s`` is the weight in step units; ``Qn``/``Qp`` bound the signed grid
(binary: ``Qn = Qp = 1``, threshold 0):

* fixed ψ: ``ste``, ``identity``, ``pwl``, ``hardtanh``, ``tanh``, ``approxsign``,
  ``fd(h)`` — functions of ``u``;
* learnable ψ: ``slste``, ``plste``, ``dlste`` — functions of ``u`` and the surrogate parameters,
  with their exact ∂ψ/∂a (``*_grad``) and SLSTE's one-byte region code (``slste_grad_code``) that
  HyperSTE keeps instead of u or ∂ψ/∂a.

The modules that hold the parameters are in :mod:`metaste.quant.surrogates` (fixed ψ) and
:mod:`metaste.quant.learnable`; :func:`metaste.quant.surrogate_factory.make_surrogate` picks one by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BOUNDARIES",
    "band",
    "ste",
    "identity",
    "hardtanh",
    "tanh",
    "approxsign",
    "fd",
    "pwl",
    "slste",
    "slste_grad",
    "slste_grad_code",
    "slste_grad_from_code",
    "plste",
    "plste_grad",
    "dlste",
    "dlste_grad",
]

BOUNDARIES = ("none", "window")  # SLSTE's ∂ψ/∂a modes (slste_grad)


# ---------------------------------------------------------------------------------------------
# Fixed surrogates: ψ(u) with Qn, Qp the grid bounds (ignored by the sign kinds)
# ---------------------------------------------------------------------------------------------


def band(u: Tensor, lo: float, hi: float) -> Tensor:
    """1{lo ≤ u ≤ hi} in ``u``'s dtype, as clamp(u) == u written into the clamped copy: on CPU
    that is several times faster than a bool mask followed by ``.to(dtype)`` (NaN gives 0)."""
    u = u.detach()  # a mask: no gradient to track
    return torch.clamp(u, lo, hi).eq_(u)


def ste(u: Tensor, qn: float, qp: float) -> Tensor:
    """Clipped STE: ψ = 1{−Qn ≤ u ≤ Qp} (closed interval, thesis eq. 2.2)."""
    return band(u, -qn, qp)


def identity(u: Tensor, qn: float, qp: float) -> Tensor:
    """Identity STE: ψ = 1 everywhere (no clipping; FOGZO's "identity STE")."""
    return torch.ones_like(u)


def hardtanh(u: Tensor, qn: float, qp: float) -> Tensor:
    """Sign surrogate of BNNs: ψ = 1{|u| ≤ 1} = d/du clip(u, −1, 1)."""
    return (u.abs() <= 1).to(u.dtype)


def tanh(u: Tensor, qn: float, qp: float, temperature: float = 1.0) -> Tensor:
    """ψ = (1 − tanh²(u/T)) / T, the derivative of tanh(u/T) (FOGZO §4.2 with T = 1)."""
    t = torch.tanh(u / temperature)
    return (1 - t * t) / temperature


def approxsign(u: Tensor, qn: float, qp: float) -> Tensor:
    """Bi-Real Net's ApproxSign: ψ = 2 − 2|u| on |u| ≤ 1, else 0."""
    return torch.clamp(2 - 2 * u.abs(), min=0)


def fd(u: Tensor, qn: float, qp: float, h: float = 0.5, binary: bool = False) -> Tensor:
    """Finite-difference STE: ψ = Σ_j (1/2h)·1{|u − (−Qn + j + ½)| < h}, j = 0..Qn+Qp−1.

    Binary (threshold 0): ψ = (1/h)·1{|u| < h}. fd(½) = ste (multi-bit), fd(1) = ste (binary)
    except on the measure-zero band edges (thesis §3.3).
    """
    if binary:
        return (u.abs() < h).to(u.dtype) / h
    # thresholds sit at −Qn + j + ½; in x = u + Qn − ½ they are the integers j = 0..Qn+Qp−1.
    # Count the integers strictly inside (x − h, x + h), clipped to that range.
    x = u + (qn - 0.5)
    hi = torch.clamp(torch.ceil(x + h) - 1, max=qn + qp - 1)
    lo = torch.clamp(torch.floor(x - h) + 1, min=0)
    return torch.clamp(hi - lo + 1, min=0) / (2 * h)


def pwl(u: Tensor, qn: float, qp: float) -> Tensor:
    """Piecewise-linear STE = PLSTE with a = 1 (thesis ch. 5; = approxsign at b = 1)."""
    return plste(u, torch.ones((), dtype=u.dtype, device=u.device), qn, qp)


# ---------------------------------------------------------------------------------------------
# Learnable surrogates and their exact ∂ψ/∂a
# ---------------------------------------------------------------------------------------------


def _band_au(u: Tensor, a: Tensor, qn: float, qp: float, inplace: bool = False) -> Tensor:
    """band(a·u, −Qn, Qp) with one weight-sized float buffer (clamp(x) == x needs two):
    1{a·u ≥ −Qn} as bools, then 1{a·u ≤ Qp} written over a·u and the two multiplied — the same
    0/1 values (NaN gives 0). ``inplace``: a·u (= u·a exactly) is formed in ``u``'s buffer."""
    au = u.detach().mul_(a.detach()) if inplace else torch.mul(a.detach(), u.detach())
    ge = au >= -qn
    return torch.le(au, qp, out=au).mul_(ge)


def slste(u: Tensor, a: Tensor, qn: float, qp: float) -> Tensor:
    """Scaled-linear STE: ψ = a·1{−Qn/a ≤ u ≤ Qp/a}. Mass Qn on u ≤ 0 and Qp on u > 0.

    ``u`` may be the one-byte region code of :func:`slste_grad_code` made with the same a."""
    if u.dtype == torch.uint8:
        return (u & 1).to(a.dtype).mul_(a)
    return _band_au(u, a, qn, qp).mul_(a)


def slste_grad(u: Tensor, a: Tensor, qn: float, qp: float, boundary: str = "none", b: float = 0.5) -> Tensor:
    """∂ψ/∂a of SLSTE, element-wise (same shape as ``u``; docs/design.md §2).

    ``"none"``: 1{a ≤ τ(u)} = ψ/a (what autograd gives; thesis Lemma 4.5.1).
    ``"window"``: 1{a ≤ τ} − (a/2b)·1{|a − τ| < b} with τ = Qp/u (u > 0), −Qn/u (u < 0),
    +∞ (u = 0) — the thesis's analytical implementation with the sign corrected.
    ``u`` may be the region code of :func:`slste_grad_code` made with the same a and boundary.
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"Invalid boundary: {boundary!r}; choose one of {BOUNDARIES}")
    if u.dtype == torch.uint8:  # a region code (slste_grad_code)
        return slste_grad_from_code(u, a, boundary, b)
    inside = _band_au(u, a, qn, qp)  # 1{−Qn ≤ a·u ≤ Qp}
    if boundary == "none":
        return inside
    # τ = Qp/u (u > 0), −Qn/u (u ≤ 0): ±inf at u = 0, where |a − τ| < b is then false, as
    # required (τ = +∞). One weight-sized buffer, the same divisions as the textbook form
    # (this ran ~15 weight-sized temporaries per step in the analytical method).
    t = torch.full_like(u, -qn).masked_fill_(u > 0, qp).div_(u)
    near = t.sub_(a).abs_().lt(b)  # |τ − a| = |a − τ|
    return inside.sub_(t.copy_(a).div_(2 * b).mul_(near))


def slste_grad_code(
    u: Tensor,
    a: Tensor,
    qn: float,
    qp: float,
    boundary: str = "none",
    b: float = 0.5,
    *,
    inplace: bool = False,
) -> Tensor:
    """:func:`slste_grad` as a one-byte region code (uint8): bit 0 is 1{−Qn ≤ a·u ≤ Qp}, bit 1
    (``"window"``) 1{|a − τ| < b}. ∂ψ/∂a takes one of four values given them, so
    :func:`slste_grad_from_code` with the same a gives slste_grad's values bit for bit, and
    :func:`slste` of the code gives ψ (a quarter of u's or d's memory; the analytical
    history's d⁻, the delayed record's u_t). ``inplace`` (``"none"`` only): ``u`` is overwritten
    (one weight-sized buffer less)."""
    code = _band_au(u, a, qn, qp, inplace and boundary != "window").to(torch.uint8)
    if boundary == "window":
        t = torch.full_like(u, -qn).masked_fill_(u > 0, qp).div_(u)  # τ, as slste_grad
        code |= t.sub_(a).abs_().lt(b).to(torch.uint8) << 1
    return code


def slste_grad_from_code(code: Tensor, a: Tensor, boundary: str = "none", b: float = 0.5) -> Tensor:
    """∂ψ/∂a of SLSTE from :func:`slste_grad_code`: inside − (a/2b)·near, the operations of
    :func:`slste_grad` (a of any granularity: broadcast to the code's shape)."""
    inside = (code & 1).to(a.dtype)
    if boundary != "window":
        return inside
    return inside.sub_((code >> 1).to(a.dtype).mul_(a.div(2 * b)))


def plste(u: Tensor, a: Tensor, qn: float, qp: float) -> Tensor:
    """Piecewise-linear STE: 2a(1 + a·u/Qn) on [−Qn/a, 0], 2a(1 − a·u/Qp) on (0, Qp/a], else 0."""
    return dlste(u, a, a, qn, qp)


def plste_grad(u: Tensor, a: Tensor, qn: float, qp: float) -> Tensor:
    """∂ψ/∂a of PLSTE: 2 + 4a·u/Qn (u ≤ 0), 2 − 4a·u/Qp (u > 0) inside the band; ∫ = 0."""
    gn, gp = dlste_grad(u, a, a, qn, qp)
    return gn + gp


def dlste(u: Tensor, a_n: Tensor, a_p: Tensor, qn: float, qp: float) -> Tensor:
    """Double-linear STE: PLSTE with ``a_n`` on u ≤ 0 and ``a_p`` on u > 0, i.e.
    ψ = max(0, 2a(1 − a·|u|/Q)) with (a, Q) = (a_n, Qn) on u ≤ 0 and (a_p, Qp) on u > 0.

    Computed with a 0/1 float mask (x·1 + y·0 = x exactly) and in-place updates of fresh
    tensors (autograd-safe): bool masks and allocations dominate the cost on CPU.
    """
    neg = torch.le(u.detach(), 0, out=torch.empty_like(u))
    # h = −Q/2: the factor 2 and the sign folded into the divisor (exact: powers of two)
    if a_n is a_p:  # PLSTE: the mask is only needed for h
        a, h = a_n, neg.mul_((qp - qn) / 2).sub_(qp / 2)
    else:
        a, h = a_n * neg + a_p * (1 - neg), neg * ((qp - qn) / 2) - qp / 2
    two_side = u.abs().mul_(a).div_(h).add_(2)  # 2(1 − a·|u|/Q)
    return two_side.mul_(a).clamp_(min=0)


def dlste_grad(u: Tensor, a_n: Tensor, a_p: Tensor, qn: float, qp: float) -> tuple[Tensor, Tensor]:
    """(∂ψ/∂a_n, ∂ψ/∂a_p) of DLSTE, element-wise; each zero outside its side's band."""
    in_n = ((u <= 0) & (a_n * u >= -qn)).to(u.dtype)
    in_p = ((u > 0) & (a_p * u <= qp)).to(u.dtype)
    return (2 + 4 * a_n * u / qn) * in_n, (2 - 4 * a_p * u / qp) * in_p
