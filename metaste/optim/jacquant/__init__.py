"""JacQuant, a learned group-wise Jacobian slope in place of the STE's mask (docs/design.md §8): the
wrapper and the slope fit (:mod:`.optimizer`) and its element-wise passes (:mod:`.passes`)."""

from .optimizer import JacQuant, fit_slope, slope_phi

__all__ = ["JacQuant", "fit_slope", "slope_phi"]
