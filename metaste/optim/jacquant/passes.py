"""JacQuant's element-wise passes (docs/design.md §8), each a function of tensors that runs eagerly
or, on a weight of at least ``FUSE_MIN`` elements, compiled into one pass (:mod:`metaste._compile`):
the same ops in the same order either way, so the same values (tests/optim/jacquant/test_jacquant_passes.py).

Every tensor is in the grouped layout (out, in/G, G) of the weight; α and γ are (out, in/G, 1).

* :func:`slopes`: b = clip(α + 2γ·|u − c|, b_min, b_max)·in, in = 1{−Qn ≤ u ≤ Qp} and the codes
  c = round(clamp(u, −Qn, Qp)) (as floats);
* :func:`step_slopes`: the step's use of them in one pass — g ← b⊙g on the weight's gradient,
  LSQ's per-element correction g·u·(in − b) of ∂L/∂s (summed by the caller), the integer codes and
  how many of them changed since the last step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._compile import FUSE_MIN, compilable, kernel

__all__ = ["slopes", "step_slopes"]


def _jq_slopes(
    u: Tensor, gamma2: Tensor, alpha: Tensor, qn: float, qp: float, lo: float, hi: float
) -> tuple[Tensor, Tensor, Tensor]:
    inside = u.clamp(-qn, qp)
    c = torch.round(inside)
    b = (u - c).abs_()
    b.mul_(gamma2).add_(alpha)
    b.clamp_(lo, hi)
    inside.eq_(u)  # band(u, −Qn, Qp)
    return b.mul_(inside), inside, c


def slopes(
    u: Tensor, gamma: Tensor, alpha: Tensor, qn: float, qp: float, b_range: tuple[float, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """(b, in, c) at ``u``. In the band round(clamp(u)) = round(u), so 2γ·|u − c| = γ·φ exactly;
    outside, b = 0 whatever φ is."""
    gamma2, alpha = gamma.to(u) * 2, alpha.to(u)
    fused = u.numel() >= FUSE_MIN and compilable(u, gamma2, alpha)
    return kernel(_jq_slopes, "jacquant", fused)(u, gamma2, alpha, qn, qp, *b_range)


def _jq_step_slopes(
    u: Tensor,
    gamma2: Tensor,
    alpha: Tensor,
    qn: float,
    qp: float,
    lo: float,
    hi: float,
    grad: Tensor | None,
    correct_s: bool,
    code_dtype: torch.dtype,
    last_codes: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    b, inside, c = _jq_slopes(u, gamma2, alpha, qn, qp, lo, hi)
    codes = c.to(code_dtype)
    flips = None if last_codes is None else (codes != last_codes).sum()
    corr = None
    if grad is not None:
        if correct_s:  # ∂L/∂s = Σ g(c − b·u): add Σ g·u·(in − b)
            corr = (grad * u).mul_(inside.sub_(b))
        grad.mul_(b)
    return codes, flips, corr


def step_slopes(
    u: Tensor,
    gamma: Tensor,
    alpha: Tensor,
    qn: float,
    qp: float,
    b_range: tuple[float, float],
    grad: Tensor | None,
    correct_s: bool,
    code_dtype: torch.dtype,
    last_codes: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(codes, flips, corr): ``grad`` ← b⊙``grad`` in place; corr = g·u·(in − b) per element with
    the gradient before the scaling (``correct_s``; None otherwise); the codes as ``code_dtype``
    and the count of those that differ from ``last_codes`` (None without them)."""
    gamma2, alpha = gamma.to(u) * 2, alpha.to(u)
    fused = u.numel() >= FUSE_MIN and compilable(
        *(t for t in (u, gamma2, alpha, grad, last_codes) if t is not None)
    )
    return kernel(_jq_step_slopes, "jacquant", fused)(
        u, gamma2, alpha, qn, qp, *b_range, grad, correct_s, code_dtype, last_codes
    )
