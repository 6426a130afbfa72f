"""PEGE's element-wise passes (docs/design.md §7), each a function of tensors that runs eagerly or,
on a tensor of at least ``FUSE_MIN`` elements, compiled into one pass (:mod:`metaste._compile`):
the same ops in the same order either way, so the same values (tests/optim/pege/test_pege_passes.py).

* :func:`front`: e = u − c with u = x/s and c the grid point, the mask M = 1{U < r} of the
  uniforms U, and EWGS's ê = δ·ψ(u)·e;
* :func:`mix` and :func:`mix_backward`: where(M, v̂, v) and its backward (v̂ gets M⊙g, v gets
  (1 − M)⊙g + M⊙|g|⊙ê plus the penalty's gradient);
* :func:`penalty_grad`: λ_t·2M⊙e/(n·s), the gradient of λ_t·mean(M⊙e²) with c and s held.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._compile import FUSE_MIN, compilable, kernel
from ...quant._functions import FUSED_PSI

__all__ = ["front", "mix", "mix_backward", "penalty_grad"]


def _fused(*tensors: Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return present[0].numel() >= FUSE_MIN and compilable(*present)


def _pege_front(
    name: str | None,
    x: Tensor,
    s: Tensor,
    binary: bool,
    uniforms: Tensor | None,
    r: Tensor | float,
    delta: float,
    qn: float,
    qp: float,
    *theta: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    u = x / s
    c = torch.where(u >= 0, 1.0, -1.0).to(x.dtype) if binary else torch.round(u).clamp_(-qn, qp)
    e = u - c
    mask = None if uniforms is None else (uniforms < r).to(x.dtype)
    e_scaled = None if name is None else FUSED_PSI[name](u, qn, qp, theta).mul_(e).mul_(delta)
    return e, e_scaled, mask


def front(
    name: str | None,
    x: Tensor,
    s: Tensor,
    binary: bool,
    uniforms: Tensor | None,
    r: float,
    delta: float,
    qn: float,
    qp: float,
    theta: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(e, ê, M) of a detached input ``x`` with step ``s``: c = clamp(round(u), −Qn, Qp) (the
    binary grid: ±1 by the sign of u, +1 at 0); ê = ψ_name(u; θ)·e·δ (``name`` None: not
    computed); M = 1{U < r} in x's dtype (``uniforms`` None: none)."""
    fused = _fused(x, s, uniforms, *theta)
    # compiled: r as a tensor (a new r(t) each step must not recompile the pass); it compares in
    # x's dtype either way
    r_arg = x.new_tensor(r) if fused else r
    return kernel(_pege_front, "pege", fused)(name, x, s, binary, uniforms, r_arg, delta, qn, qp, *theta)


def _pege_mix(mask: Tensor, vhat: Tensor, v: Tensor) -> Tensor:
    return vhat.where(mask != 0, v)


def mix(mask: Tensor, vhat: Tensor, v: Tensor) -> Tensor:
    """where(M, v̂, v)."""
    return kernel(_pege_mix, "pege", _fused(mask, vhat, v))(mask, vhat, v)


def _pege_mix_backward(
    g: Tensor, mask: Tensor | None, e_scaled: Tensor | None, pen: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    if mask is None:
        gv = None if e_scaled is None else g.abs() * e_scaled
        gvhat = g
    else:
        gvhat = g * mask
        gv = g - gvhat
        if e_scaled is not None:
            gv = gv + gvhat.abs() * e_scaled
    if pen is not None:
        gv = pen if gv is None else gv + pen
    return gv, gvhat


def mix_backward(
    g: Tensor, mask: Tensor | None, e_scaled: Tensor | None, pen: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    """(∂L/∂v, ∂L/∂v̂) of where(M, v̂, v) with EWGS's term and the penalty's gradient ``pen``."""
    return kernel(_pege_mix_backward, "pege", _fused(g, mask, e_scaled, pen))(g, mask, e_scaled, pen)


def _pege_penalty_grad(e: Tensor, s: Tensor, scale: Tensor | float, mask: Tensor | None) -> Tensor:
    g = e * scale / s
    return g if mask is None else g.mul_(mask)


def penalty_grad(e: Tensor, s: Tensor, mask: Tensor | None, lam_t: float) -> Tensor:
    """∂/∂x of λ_t·mean(M⊙(x/s − c)²) with c and s held: λ_t·2M⊙e/(n·s), n = e.numel()."""
    fused = _fused(e, s, mask)
    scale = 2.0 * lam_t / e.numel()
    scale_arg = e.new_tensor(scale) if fused else scale  # compiled: λ_t changes with r(t)
    return kernel(_pege_penalty_grad, "pege", fused)(e, s, scale_arg, mask)
