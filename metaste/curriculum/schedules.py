"""The schedules ρ(t) ∈ [0, 1] of a quantization curriculum (docs/design.md §12): the fraction (or
weight) of the model seen quantized at step t, τ = min(t/T_c, 1), T_c the curriculum's length.

* ``linear``: ρ = τ;  * ``cosine``: ρ = ½(1 − cos πτ);  * ``log``: ρ = ln(1 + kτ)/ln(1 + k)
  (PEGE's; k = 0 is linear);  * ``step``: ρ = ⌊τ·n⌋/n, n stages.

Every schedule is 1 from τ = 1 on, so at t ≥ T_c the model is the plain quantized one.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "ratio"]

SCHEDULES = ("linear", "cosine", "log", "step")


def ratio(t: int, length: int, schedule: str = "linear", *, k: float = 9.0, stages: int = 4) -> float:
    """ρ(t) of ``schedule`` over a curriculum of ``length`` steps (T_c; 0: ρ ≡ 1)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid schedule {schedule!r}; choose one of {SCHEDULES}")
    if length <= 0 or t >= length:
        return 1.0
    tau = max(t, 0) / length
    if schedule == "linear":
        return tau
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * tau))
    if schedule == "log":
        return tau if k == 0 else math.log1p(k * tau) / math.log1p(k)
    return math.floor(tau * stages) / stages
