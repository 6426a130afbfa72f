"""Surrogate gradients ψ(u; θ) that replace ∂v̂/∂v in the backward pass (docs/design.md §2).

``u = v / s`` is the weight in step units; ``Qn``/``Qp`` bound the signed grid
(binary: ``Qn = Qp = 1``, threshold 0). Every formula of docs/design.md §2 lives here:

* fixed ψ: ``ste``, ``identity``, ``pwl``, ``hardtanh``, ``tanh``, ``approxsign``,
  ``fd(h)`` — plain functions of ``u``;
* learnable ψ: ``slste``, ``plste``, ``dlste`` — functions of ``u`` and the
  surrogate parameters, with their exact ∂ψ/∂a (``*_grad``);
* :class:`Surrogate` modules that hold the parameters as *buffers*, so they stay
  out of ``model.parameters()`` (the base optimizer never trains them) but are
  saved in ``state_dict()``.

Learnable parameters are initialised to their baseline (a = 1) and clamped to
``[a_min, a_max]`` (docs/design.md §2 *[decision]*).

Size: ~510 lines, over the ~400 the package aims for, on purpose: this is the one file of every
formula of docs/design.md §2 (ten ψ, three ∂ψ/∂a, SLSTE's one-byte region code that HyperSTE
keeps instead of u or ∂ψ/∂a, and the modules holding them); splitting the fixed from the
learnable ψ would separate ``pwl`` from the PLSTE it equals at a = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FIXED_SURROGATES",
    "LEARNABLE_SURROGATES",
    "SURROGATES",
    "GRANULARITIES",
    "BOUNDARIES",
    "Surrogate",
    "FixedSurrogate",
    "LearnableSurrogate",
    "make_surrogate",
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

# Default clamp of learnable surrogate parameters. a = 1 is the baseline; a <= a_min would make
# ψ ≈ 0 (the element stops learning), a >= a_max makes the band tiny. See HyperSTE docs.
A_MIN_DEFAULT = 0.25
A_MAX_DEFAULT = 4.0


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


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

FIXED_SURROGATES: dict[str, Callable[..., Tensor]] = {
    "ste": ste,
    "identity": identity,
    "pwl": pwl,
    "hardtanh": hardtanh,
    "tanh": tanh,
    "approxsign": approxsign,
    "fd": fd,
}
LEARNABLE_SURROGATES = ("slste", "plste", "dlste")
CALIBRATED_SURROGATES = ("leaky",)  # fitted by metaste.Calibrated (quant/leaky.py, docs/design.md §9)
SURROGATES = tuple(FIXED_SURROGATES) + LEARNABLE_SURROGATES + CALIBRATED_SURROGATES
GRANULARITIES = ("element", "channel", "tensor")
BOUNDARIES = ("none", "window")


def _check_name(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {what} {value!r}; valid choices are {tuple(valid)}")


class Surrogate(nn.Module):
    """Base class: ``psi(u, qn, qp)`` evaluates ψ element-wise for a weight in step units and
    returns a new tensor of ``u``'s shape (the quantizers' backward multiplies it in place).

    ``ste_kind`` is the smoothing kind FOGZO uses for a weight with this surrogate (docs/design.md §4.2):
    ``"identity"`` for round-based quantizers, a sign kind for binary weights: ``tanh`` → tanh;
    ``approxsign``, ``pwl``, ``plste``, ``dlste`` (triangular at a = 1) → approxsign; the rest
    (``ste``, ``hardtanh``, ``fd``, ``slste``, ``identity``: box-shaped) → hardtanh.
    """

    name: str = ""
    learnable: bool = False

    def __init__(self, binary: bool = False) -> None:
        super().__init__()
        self.binary = binary

    def psi(self, u: Tensor, qn: float, qp: float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def code(
        self,
        u: Tensor,
        qn: float,
        qp: float,
        params: Sequence[Tensor] | None = None,
        *,
        inplace: bool = False,
    ) -> Tensor | None:
        """A compact stand-in for u that :meth:`psi` takes (:meth:`LearnableSurrogate.code`); none here."""
        return None

    @property
    def ste_kind(self) -> str:
        if not self.binary:
            return "identity"
        if self.name == "tanh":
            return "tanh"
        if self.name in ("approxsign", "pwl", "plste", "dlste"):
            return "approxsign"
        return "hardtanh"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, binary={self.binary}"


class FixedSurrogate(Surrogate):
    """A fixed ψ from :data:`FIXED_SURROGATES` (no parameters). ``kwargs``: ``h`` for ``fd``,
    ``temperature`` for ``tanh``."""

    def __init__(self, name: str, binary: bool = False, **kwargs: float) -> None:
        super().__init__(binary)
        _check_name(name, tuple(FIXED_SURROGATES), "surrogate")
        allowed = {"fd": {"h"}, "tanh": {"temperature"}}.get(name, set())
        bad = set(kwargs) - allowed
        if bad:
            raise TypeError(
                f"surrogate {name!r} takes no argument(s) {sorted(bad)}; it accepts {sorted(allowed)}"
            )
        if name == "fd":
            h = float(kwargs.get("h", 1.0 if binary else 0.5))
            if not h > 0:
                raise ValueError(f"Invalid fd width h: {h}; it must be > 0")
            kwargs = {"h": h, "binary": binary}
        if name == "tanh" and not kwargs.get("temperature", 1.0) > 0:
            raise ValueError(f"Invalid tanh temperature: {kwargs['temperature']}; it must be > 0")
        self.name = name
        self.kwargs = kwargs
        self._fn = FIXED_SURROGATES[name]

    def psi(self, u: Tensor, qn: float, qp: float) -> Tensor:
        return self._fn(u, qn, qp, **self.kwargs)


class LearnableSurrogate(Surrogate):
    """SLSTE / PLSTE / DLSTE with parameters held as buffers (``a``; ``a_n``/``a_p`` for DLSTE).

    Args:
        name: ``"slste"``, ``"plste"`` or ``"dlste"``.
        weight_shape: shape of the weight this surrogate serves.
        granularity: ``"element"`` (one a per weight), ``"channel"`` (per output channel, dim 0)
            or ``"tensor"`` (one a). Coarser granularity sums the element hypergradients.
        a_min, a_max: clamp of the parameters (a > 0 is required).
        boundary: SLSTE's ∂ψ/∂a mode, ``"none"`` or ``"window"`` with width ``b`` (docs/design.md §2).
        binary: grid is binary (Qn = Qp = 1).
    """

    learnable = True

    def __init__(
        self,
        name: str,
        weight_shape: Sequence[int],
        granularity: str = "element",
        a_min: float = A_MIN_DEFAULT,
        a_max: float = A_MAX_DEFAULT,
        boundary: str = "none",
        b: float = 0.5,
        binary: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(binary)
        _check_name(name, LEARNABLE_SURROGATES, "learnable surrogate")
        _check_name(granularity, GRANULARITIES, "granularity")
        _check_name(boundary, BOUNDARIES, "boundary")
        if not 0 < a_min <= 1 <= a_max or not math.isfinite(a_max):
            raise ValueError(
                f"Invalid clamp [a_min, a_max] = [{a_min}, {a_max}]; need 0 < a_min <= 1 <= a_max < inf"
            )
        if not b > 0:
            raise ValueError(f"Invalid boundary window b: {b}; it must be > 0")
        shape = tuple(weight_shape)
        if granularity == "channel" and len(shape) < 2:
            raise ValueError(
                f"granularity='channel' needs a weight with >= 2 dims, got shape {shape}; "
                "use granularity='tensor' or 'element'"
            )
        self.name = name
        self.granularity = granularity
        self.a_min, self.a_max = float(a_min), float(a_max)
        self.boundary, self.b = boundary, float(b)
        self.weight_shape = shape
        pshape = {
            "element": shape,
            "channel": (shape[0],) + (1,) * (len(shape) - 1) if shape else (),
            "tensor": (1,) * len(shape),
        }[granularity]
        for pname in self.param_names:
            self.register_buffer(pname, torch.ones(pshape, dtype=dtype, device=device))

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("a_n", "a_p") if self.name == "dlste" else ("a",)

    def params(self) -> tuple[Tensor, ...]:
        """The surrogate parameters (buffers), in :attr:`param_names` order."""
        return tuple(getattr(self, n) for n in self.param_names)

    def psi(self, u: Tensor, qn: float, qp: float, params: Sequence[Tensor] | None = None) -> Tensor:
        """ψ(u; θ) with θ = ``params`` (default: the stored buffers). Differentiable in θ
        through :func:`psi_differentiable`."""
        p = self.params() if params is None else tuple(params)
        if self.name == "slste":
            return slste(u, p[0], qn, qp)
        if self.name == "plste":
            return plste(u, p[0], qn, qp)
        return dlste(u, p[0], p[1], qn, qp)

    def dpsi(
        self, u: Tensor, qn: float, qp: float, params: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, ...]:
        """Element-wise ∂ψ/∂θ, one tensor of ``u``'s shape per parameter (docs/design.md §2).

        Reduce to a parameter's shape with ``grad.sum_to_size(param.shape)``.
        """
        p = self.params() if params is None else tuple(params)
        if self.name == "slste":
            return (slste_grad(u, p[0], qn, qp, self.boundary, self.b),)
        if self.name == "plste":
            return (plste_grad(u, p[0], qn, qp),)
        return dlste_grad(u, p[0], p[1], qn, qp)

    def code(
        self,
        u: Tensor,
        qn: float,
        qp: float,
        params: Sequence[Tensor] | None = None,
        *,
        inplace: bool = False,
    ) -> Tensor | None:
        """u as a one-byte region code that :meth:`psi` and :meth:`dpsi` take in its place with the
        same θ, bit for bit (SLSTE: :func:`slste_grad_code`), or ``None`` where ψ needs u itself.
        ``inplace``: ``u`` may be overwritten (the caller's own, not used after)."""
        p = self.params() if params is None else tuple(params)
        if self.name != "slste" or u.dtype != p[0].dtype or u.dtype == torch.uint8:
            return None
        return slste_grad_code(u.detach(), p[0].detach(), qn, qp, self.boundary, self.b, inplace=inplace)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every parameter to [a_min, a_max] in place."""
        for p in self.params():
            p.clamp_(self.a_min, self.a_max)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, granularity={self.granularity!r}, a in [{self.a_min}, "
            f"{self.a_max}], boundary={self.boundary!r}, binary={self.binary}"
        )


class _PsiWithCustomGrad(torch.autograd.Function):
    """ψ(u; θ) whose backward in θ is :meth:`LearnableSurrogate.dpsi` (honours the SLSTE
    boundary mode, which plain autograd cannot express). Not ``once_differentiable``-marked
    paths are avoided on purpose: the graph to θ must survive (docs/design.md §3.2 traps)."""

    @staticmethod
    def forward(ctx, surrogate, u, qn, qp, *params):  # type: ignore[override]
        ctx.surrogate, ctx.qn, ctx.qp = surrogate, qn, qp
        ctx.save_for_backward(u, *params)
        return surrogate.psi(u, qn, qp, params)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        u, *params = ctx.saved_tensors
        grads = ctx.surrogate.dpsi(u, ctx.qn, ctx.qp, params)
        out = [(grad_out * g).sum_to_size(p.shape) for g, p in zip(grads, params)]
        return (None, None, None, None, *out)


def psi_differentiable(
    surrogate: LearnableSurrogate, u: Tensor, qn: float, qp: float, params: Sequence[Tensor]
) -> Tensor:
    """ψ(u; θ) as a function autograd can differentiate in θ, with ∂ψ/∂θ = ``surrogate.dpsi``
    (so ``boundary="window"`` is respected). ``u`` is treated as a constant."""
    return _PsiWithCustomGrad.apply(surrogate, u.detach(), qn, qp, *params)


def make_surrogate(
    name: str,
    weight_shape: Sequence[int] = (),
    *,
    binary: bool = False,
    granularity: str = "element",
    a_min: float = A_MIN_DEFAULT,
    a_max: float = A_MAX_DEFAULT,
    boundary: str = "none",
    b: float = 0.5,
    dtype: torch.dtype = torch.float32,
    **kwargs: float,
) -> Surrogate:
    """Build a surrogate by name: a fixed one (``kwargs``: ``h``, ``temperature``) or a learnable
    one (``weight_shape``, ``granularity``, clamp, boundary, parameter ``dtype``). ``granularity``
    and ``boundary`` are validated for every name, so a typo never passes silently."""
    if not isinstance(name, str):
        raise TypeError(f"surrogate must be a name (str), got {type(name).__name__}")
    _check_name(name, SURROGATES, "surrogate")
    _check_name(granularity, GRANULARITIES, "granularity")
    _check_name(boundary, BOUNDARIES, "boundary")
    if name in CALIBRATED_SURROGATES:
        from .leaky import LeakySurrogate

        return LeakySurrogate(weight_shape, granularity, binary=binary, dtype=dtype, **kwargs)
    if name in LEARNABLE_SURROGATES:
        if kwargs:
            raise TypeError(f"learnable surrogate {name!r} takes no extra arguments {sorted(kwargs)}")
        return LearnableSurrogate(
            name, weight_shape, granularity, a_min, a_max, boundary, b, binary=binary, dtype=dtype
        )
    return FixedSurrogate(name, binary=binary, **kwargs)
