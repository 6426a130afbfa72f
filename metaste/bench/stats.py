"""Mean ± 95% confidence intervals over seeds (Student t), plain and paired."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["t_quantile", "mean_ci", "paired_diff_ci", "fmt_ci"]

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (above: normal)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(dof: int) -> float:
    """t_{0.975, dof}: the half-width multiplier of a two-sided 95% interval."""
    return _T975[dof - 1] if dof <= len(_T975) else 1.960


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% CI of the mean); half-width is nan for one value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def paired_diff_ci(values: Sequence[float], reference: Sequence[float]) -> tuple[float, float]:
    """Mean ± 95% CI of the per-seed differences ``values − reference`` (same seeds, same order)."""
    if len(values) != len(reference):
        raise ValueError(f"paired comparison needs equal lengths, got {len(values)} and {len(reference)}")
    return mean_ci(np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64))


def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    """``"m ± h"`` (``"m"`` alone when h is nan)."""
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"
