"""FOGZO's settings: the checks the constructor runs before it takes the optimizer, and the β
schedule they define (docs/design.md §4.4): β_t = 1 − (1 − β_min)·min(1, t/T), or a user's
``beta_schedule(t)``."""

from __future__ import annotations

from collections.abc import Callable

from .estimator import RESTORE_MODES

__all__ = ["beta_at", "check_settings"]


def beta_at(
    t: int,
    num_managed: int | None,
    beta_min: float | None,
    total_steps: int | None,
    beta_schedule: Callable[[int], float] | None,
) -> float:
    """β_t: ``beta_schedule(t)`` (checked to lie in [0, 1]) or the linear decay from 1 to β_min
    over ``total_steps`` (β_min = 1 − 1/D by default, D = ``num_managed``)."""
    if beta_schedule is not None:
        beta = float(beta_schedule(t))
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"Invalid beta: beta_schedule({t}) = {beta}; it must lie in [0, 1]")
        return beta
    beta_min = beta_min if beta_min is not None else 1.0 - 1.0 / num_managed
    if beta_min == 1.0:
        return 1.0
    return 1.0 - (1.0 - beta_min) * min(1.0, t / total_steps)


def check_settings(
    n: int,
    beta_min: float | None,
    total_steps: int | None,
    beta_schedule: Callable[[int], float] | None,
    ste_fraction: float,
    restore: str,
    seed: int,
    fused: bool | str,
) -> None:
    """A clear error for a bad FOGZO setting, before the wrapper takes the optimizer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Invalid n: {n!r}; the number of directions must be an int >= 1")
    if beta_min is not None and not 0.0 <= beta_min <= 1.0:
        raise ValueError(f"Invalid beta_min: {beta_min}; it must lie in [0, 1]")
    if total_steps is not None and (
        isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
    ):
        raise ValueError(f"Invalid total_steps: {total_steps!r}; it must be an int >= 1")
    if not 0.0 <= ste_fraction <= 1.0:
        raise ValueError(f"Invalid ste_fraction: {ste_fraction}; it must lie in [0, 1]")
    if beta_schedule is not None and not callable(beta_schedule):
        raise TypeError(f"beta_schedule must be callable t -> beta, got {type(beta_schedule).__name__}")
    decays = beta_schedule is None and (beta_min is None or beta_min < 1.0)
    if total_steps is None and (decays or ste_fraction > 0):
        raise ValueError(
            "total_steps is required: "
            + (
                f"ste_fraction={ste_fraction} is a fraction of it"
                if ste_fraction > 0
                else "β decays linearly from 1 to beta_min (default 1 - 1/D) over total_steps; "
                "pass total_steps=<training steps>, or a constant schedule such as "
                "beta_schedule=lambda t: 0.999"
            )
        )
    if restore not in RESTORE_MODES:
        raise ValueError(f"Invalid restore: {restore!r}; choose one of {RESTORE_MODES}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if fused not in (True, False, "auto"):
        raise ValueError(f"Invalid fused: {fused!r}; choose True, False or 'auto'")
