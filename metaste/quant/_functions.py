"""The quantizers' autograd Functions (docs/design.md §1): the round quantizer (fixed step, LSQ)
and DoReFa's sign, their backward's element-wise work compiled on large weights.

The backward never relies on ``clamp``'s own gradient: ∂L/∂v = ∂L/∂v̂ · ψ(v/s), and for a
learnable step (LSQ) ∂v̂/∂s = round(u) − u inside [−Qn, Qp], −Qn below, Qp above, times the
gradient scale. A quantizer whose ``defer_surrogate`` flag is set gets ∂L/∂v = ∂L/∂v̂ (ψ ≡ 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._compile import FUSE_MIN, compilable, kernel
from .leaky import LeakySurrogate, leaky
from .learnable import LearnableSurrogate
from .psi import approxsign, band, dlste, hardtanh, plste, pwl, slste
from .surrogates import FixedSurrogate, Surrogate

# The backward's element-wise work (ψ·g, and LSQ's per-element ∂v̂/∂s·g) as one function of the
# surrogate's name and parameters: compiled into one pass for a weight of >= FUSE_MIN elements
# (a learnable ψ took ~5 passes, the clipped STE with LSQ ~7), eager otherwise. The
# same ops in the same order either way: the same values (tests/quant/test_quant_fused.py).

#: the surrogates whose ψ the compiled backward evaluates (the others run eagerly)
FUSED_PSI = {
    "ste": lambda u, qn, qp, th: band(u, -qn, qp),
    "hardtanh": lambda u, qn, qp, th: hardtanh(u, qn, qp),
    "approxsign": lambda u, qn, qp, th: approxsign(u, qn, qp),
    "pwl": lambda u, qn, qp, th: pwl(u, qn, qp),
    "slste": lambda u, qn, qp, th: slste(u, th[0], qn, qp),
    "plste": lambda u, qn, qp, th: plste(u, th[0], qn, qp),
    "dlste": lambda u, qn, qp, th: dlste(u, th[0], th[1], qn, qp),
    "leaky": lambda u, qn, qp, th: leaky(u, th[0], th[1], qn, qp),
}


def fused_psi_name(s: Surrogate, deferred: bool) -> str | None:
    """The key of ``s`` in :data:`FUSED_PSI` ("" when ψ is deferred), or None: eager only (also
    PEGE's compiled front pass, :mod:`metaste.optim.pege.passes`)."""
    if deferred:
        return ""
    if isinstance(s, (LearnableSurrogate, LeakySurrogate)) or (
        isinstance(s, FixedSurrogate) and not s.kwargs
    ):
        return s.name if s.name in FUSED_PSI else None
    return None


def _round_backward(
    name: str, u: Tensor, g: Tensor, need_v: bool, need_s: bool, qn: float, qp: float, *theta: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """(∂L/∂v, the per-element ∂L/∂s before its sum) of :class:`_RoundQuantFn`: ψ(u)·g (``name``
    "": ψ ≡ 1) and (round(u) − u inside the band, c = clamp(round(u)) outside)·g."""
    gv = gs = inside = None
    if need_v:
        if name == "":
            gv = g
        elif name == "ste":
            inside = band(u, -qn, qp)  # ψ_ste, shared with ∂v̂/∂s below
            gv = g * inside
        else:
            gv = FUSED_PSI[name](u, qn, qp, theta).mul_(g)
    if need_s:
        if inside is None:
            inside = band(u, -qn, qp)
        # c + (−u·0) = c exactly outside the band
        gs = inside.mul_(u).neg_().add_(torch.round(u).clamp_(-qn, qp)).mul_(g)
    return gv, gs


def _sign_backward(name: str, v: Tensor, u_scale: Tensor, g: Tensor, *theta: Tensor) -> Tensor:
    """∂L/∂v of :class:`_SignQuantFn`: g·ψ(v / u_scale) on the binary grid (Qn = Qp = 1)."""
    return g * FUSED_PSI[name](v / u_scale, 1, 1, theta)


def psi_params(s: Surrogate) -> tuple[Tensor, ...]:
    """The parameters θ that :data:`FUSED_PSI`'s ψ of ``s`` takes (none for a fixed ψ)."""
    return s.params() if isinstance(s, (LearnableSurrogate, LeakySurrogate)) else ()


class _RoundQuantFn(torch.autograd.Function):
    """v̂ = clamp(round(v/s), −Qn, Qp)·s; backward: ψ for v, the LSQ formula for s."""

    @staticmethod
    def forward(ctx, v, s, qn, qp, quantizer, grad_scale):  # type: ignore[override]
        # eager: a compiled forward measured no faster (four cheap passes against one call's
        # Dynamo overhead, in every forward FOGZO runs too)
        u = v / s
        # u is saved (not recomputed from v, s): one division less in backward, one tensor of
        # the weight's size held until backward; the codes round(u) are recomputed from it
        ctx.save_for_backward(u)
        ctx.qn, ctx.qp, ctx.quantizer, ctx.grad_scale, ctx.s_shape = qn, qp, quantizer, grad_scale, s.shape
        return torch.round(u).clamp_(-qn, qp).mul_(s)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (u,) = ctx.saved_tensors
        qn, qp, q = ctx.qn, ctx.qp, ctx.quantizer
        need_v, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        name = fused_psi_name(q.surrogate, q.defer_surrogate) if need_v else ""
        if name is not None:
            theta = psi_params(q.surrogate) if name else ()
            fused = u.numel() >= FUSE_MIN and compilable(u, g, *theta)
            gv, gs = kernel(_round_backward, "quant", fused)(name, u, g, need_v, need_s, qn, qp, *theta)
        else:  # a surrogate with arguments (fd, tanh), eagerly
            gv = q.surrogate.psi(u, qn, qp).mul_(g)  # psi returns a new tensor
            gs = _round_backward("", u, g, False, need_s, qn, qp)[1]
        if gs is not None:
            gs = gs.sum_to_size(ctx.s_shape) * ctx.grad_scale
        return gv, gs, None, None, None, None


class _SignQuantFn(torch.autograd.Function):
    """DoReFa binary: v̂ = sign(v)·E (sign(0) = +1, E detached); backward ψ(v / u_scale)."""

    @staticmethod
    def forward(ctx, v, e, u_scale, quantizer):  # type: ignore[override]
        ctx.save_for_backward(v, u_scale)
        ctx.quantizer = quantizer
        return torch.where(v >= 0, e, -e)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        v, u_scale = ctx.saved_tensors
        q = ctx.quantizer
        if q.defer_surrogate:
            return g, None, None, None
        name = fused_psi_name(q.surrogate, False)
        if name is None:
            return g * q.surrogate.psi(v / u_scale, 1, 1), None, None, None
        theta = psi_params(q.surrogate)
        fused = v.numel() >= FUSE_MIN and compilable(v, u_scale, g, *theta)
        return kernel(_sign_backward, "quant", fused)(name, v, u_scale, g, *theta), None, None, None
